"""Checkpoint families (SPEC §8): what each Hugging Face architecture changes in the one
model, and the table from its tensor names to ours.

There is one engine and one layer loop. A family is a difference, not a fork (gpt-fast's
convert_hf_checkpoint way): it sets the few ModelConfig fields the loop's named pieces read
(``n_kv_heads``, ``d_head``, ``activation``, ``qk_norm``, ``router_renorm``,
``tie_word_embeddings``) and names the tensors. This module is pure: no files (checkpoint.py
reads and writes them).

- ``spmd``: SPEC §1's model, exported by ``spmd-moe export`` (``SpmdMoeForCausalLM``).
- ``mixtral`` (``MixtralForCausalLM``): grouped-query attention, SwiGLU experts ``w1/w3/w2``,
  renormalised top-k.
- ``qwen3_moe`` (``Qwen3MoeForCausalLM``): explicit ``head_dim``, RMSNorm on each head of q
  and k, renormalisation when ``norm_topk_prob``, experts of ``moe_intermediate_size``.
- ``olmoe`` (``OlmoeForCausalLM``): RMSNorm on the whole q and k projections, top-k weights
  renormalised only when ``norm_topk_prob`` (false in the published model).
- ``qwen2_moe`` (``Qwen2MoeForCausalLM``): q/k/v biases, a shared expert gated by
  ``sigmoid(x W_sg)``, dense layers where ``mlp_only_layers``/``decoder_sparse_step`` say.
- ``deepseek_v3`` (``DeepseekV3ForCausalLM``, also Kimi K2): multi-head latent attention,
  sigmoid router with a selection bias and expert groups, shared experts, the first
  ``first_k_dense_replace`` layers dense; FP8 block-quantised checkpoints.

Checkpoint matrices are ``nn.Linear`` weights, ``[out, in]``; ours are ``[in, out]``
(``y = x W``): every 2-D tensor but the embedding is transposed on load.

Anything a config asks for that the engine does not implement (RoPE scaling other than
YaRN, sliding windows, biases, shared experts or dense layers outside the families that
have them, q/k/v clipping, quantisation other than FP8 blocks) is refused with an error
naming the config.json field; unknown fields that do not change the forward pass (dropout,
initializer range, aux-loss coefficients) are ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator

from ..core.config import FAMILIES, ModelConfig, Yarn
from ..core.errors import ConfigError
from ..core.files import check_json
from .weights import gain_shapes, layer_keys, tensor_family, tensor_shapes

# Our tensor names (weights.py) -> the checkpoint's. ``{l}`` layer, ``{e}`` expert.
_DENSE_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{l}.attn_norm": "model.layers.{l}.input_layernorm.weight",
    "layers.{l}.wq": "model.layers.{l}.self_attn.q_proj.weight",
    "layers.{l}.wk": "model.layers.{l}.self_attn.k_proj.weight",
    "layers.{l}.wv": "model.layers.{l}.self_attn.v_proj.weight",
    "layers.{l}.wo": "model.layers.{l}.self_attn.o_proj.weight",
    "layers.{l}.moe_norm": "model.layers.{l}.post_attention_layernorm.weight",
    "layers.{l}.q_norm": "model.layers.{l}.self_attn.q_norm.weight",
    "layers.{l}.k_norm": "model.layers.{l}.self_attn.k_norm.weight",
}
_BLOCK_SPARSE_NAMES = {   # Mixtral's (and SPEC §1's export)
    "layers.{l}.router": "model.layers.{l}.block_sparse_moe.gate.weight",
    "layers.{l}.experts.{e}.w1": "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
    "layers.{l}.experts.{e}.w2": "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",
    "layers.{l}.experts.{e}.w3": "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
}
_MLP_NAMES = {            # Qwen3-MoE's and OLMoE's
    "layers.{l}.router": "model.layers.{l}.mlp.gate.weight",
    "layers.{l}.experts.{e}.w1": "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
    "layers.{l}.experts.{e}.w2": "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
    "layers.{l}.experts.{e}.w3": "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
}


def _swiglu_names(ours: str, theirs: str) -> dict[str, str]:
    """A SwiGLU MLP's three matrices: ours ``{ours}.w1/w2/w3``, theirs gate/down/up."""
    return {f"layers.{{l}}.{ours}.{w}": f"model.layers.{{l}}.{theirs}.{proj}_proj.weight"
            for w, proj in (("w1", "gate"), ("w2", "down"), ("w3", "up"))}


_QWEN2_MOE_NAMES = {
    **_DENSE_NAMES, **_MLP_NAMES,
    **{f"layers.{{l}}.b{x}": f"model.layers.{{l}}.self_attn.{x}_proj.bias" for x in "qkv"},
    **_swiglu_names("shared", "mlp.shared_expert"),
    "layers.{l}.shared_gate": "model.layers.{l}.mlp.shared_expert_gate.weight",
    **_swiglu_names("mlp", "mlp"),
}
_DEEPSEEK_NAMES = {
    **{k: _DENSE_NAMES[k] for k in ("embed", "final_norm", "lm_head", "layers.{l}.attn_norm",
                                    "layers.{l}.moe_norm", "layers.{l}.wq", "layers.{l}.wo")},
    **{f"layers.{{l}}.{ours}": f"model.layers.{{l}}.self_attn.{theirs}.weight" for ours, theirs
       in (("wq_a", "q_a_proj"), ("q_a_norm", "q_a_layernorm"), ("wq_b", "q_b_proj"),
           ("wkv_a", "kv_a_proj_with_mqa"), ("kv_a_norm", "kv_a_layernorm"),
           ("wkv_b", "kv_b_proj"))},
    **_MLP_NAMES,
    "layers.{l}.router_bias": "model.layers.{l}.mlp.gate.e_score_correction_bias",
    **_swiglu_names("shared", "mlp.shared_experts"),
    **_swiglu_names("mlp", "mlp"),
}


@dataclass(frozen=True)
class Family:
    """One checkpoint format: its config.json keys and defaults, and its tensor names."""

    name: str                      # ModelConfig.family
    architecture: str              # config.json "architectures"[0]
    model_type: str                # config.json "model_type"
    hidden_act: str                # the only activation its experts take
    qk_norm: str
    names: dict[str, str]
    experts_keys: tuple[str, ...]  # config keys giving the expert count, first found wins
    ff_keys: tuple[str, ...]       # ... and the expert width
    renorm_key: str | None         # config key of top-k renormalisation; None: always
    defaults: dict = field(default_factory=dict)   # transformers' config defaults
    # Its own fields (config.json -> ModelConfig keyword arguments), and the config keys
    # they read that the other families refuse.
    reader: Callable[[dict, "Family", int], dict] | None = None
    reads: frozenset = frozenset()

    @property
    def activation(self) -> str:
        return "swiglu" if self.hidden_act == "silu" else "gelu"


def _qwen2_moe(hf: dict, family: "Family", n_layers: int) -> dict:
    """Qwen2-MoE's q/k/v biases, gated shared expert and dense layers (a layer is dense
    when listed in ``mlp_only_layers`` or when ``(l + 1) % decoder_sparse_step != 0``)."""
    step = _get(hf, family, "decoder_sparse_step")
    if step < 1:
        raise _refuse("decoder_sparse_step", f"{step!r} must be >= 1")
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(isinstance(l, bool) or not isinstance(l, int)
                                         for l in only):
        raise _refuse("mlp_only_layers", f"{only!r} must be a list of layer indices")
    dense = tuple(l for l in range(n_layers) if l in only or (l + 1) % step)
    shared = _get(hf, family, "shared_expert_intermediate_size")
    if shared < 0:
        raise _refuse("shared_expert_intermediate_size", f"{shared!r} must be >= 0")
    return dict(qkv_bias=_flag(hf, family, "qkv_bias"), d_shared=shared,
                shared_gate=shared > 0, dense_layers=dense,
                d_ff_dense=_get(hf, family, "intermediate_size") if dense else 0)


def _deepseek_v3(hf: dict, family: "Family", n_layers: int) -> dict:
    """DeepSeek-V3's multi-head latent attention, grouped sigmoid router with its selection
    bias, shared experts and leading dense layers, as transformers' DeepseekV3 computes
    them (which ignores ``scoring_func`` and ``topk_method``: any but DeepSeek-V3's own is
    refused rather than silently run as those)."""
    for key, value in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"),
                       ("moe_layer_freq", 1)):
        if key in hf and hf[key] != value:
            raise _refuse(key, f"{hf[key]!r}: DeepseekV3ForCausalLM routes with {value!r}")
    heads = _get(hf, family, "num_attention_heads")
    kv = hf.get("num_key_value_heads")
    if kv is not None and kv != heads:
        raise _refuse("num_key_value_heads", f"{kv!r}: the latent expands to every query "
                                             f"head; must equal num_attention_heads={heads}")
    q_lora = hf.get("q_lora_rank", family.defaults["q_lora_rank"])
    q_lora = 0 if q_lora is None else _get(hf, family, "q_lora_rank")
    nope, rope = _get(hf, family, "qk_nope_head_dim"), _get(hf, family, "qk_rope_head_dim")
    n_shared = _get(hf, family, "n_shared_experts")
    first_dense = _get(hf, family, "first_k_dense_replace")
    if q_lora < 0 or nope < 0 or n_shared < 0 or first_dense < 0:
        raise _refuse("q_lora_rank", "ranks, widths and counts must be >= 0")
    dense = tuple(range(min(first_dense, n_layers)))
    return dict(attention="mla", d_head=nope + rope, rope_dim=rope,
                v_head_dim=_get(hf, family, "v_head_dim"), q_lora_rank=q_lora,
                kv_lora_rank=_get(hf, family, "kv_lora_rank"),
                rope_interleave=_flag(hf, family, "rope_interleave"),
                router_score="sigmoid", router_bias=True,
                n_group=_get(hf, family, "n_group"), topk_group=_get(hf, family, "topk_group"),
                routed_scale=_get(hf, family, "routed_scaling_factor", float),
                d_shared=_first(hf, family, family.ff_keys) * n_shared,
                dense_layers=dense,
                d_ff_dense=_get(hf, family, "intermediate_size") if dense else 0)


FAMILY_TABLE: dict[str, Family] = {f.name: f for f in (
    Family("spmd", "SpmdMoeForCausalLM", "spmd_moe", "gelu", "none",
           {**_DENSE_NAMES, **_BLOCK_SPARSE_NAMES}, ("num_local_experts",),
           ("intermediate_size",), None,
           {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}),
    Family("mixtral", "MixtralForCausalLM", "mixtral", "silu", "none",
           {**_DENSE_NAMES, **_BLOCK_SPARSE_NAMES}, ("num_local_experts",),
           ("intermediate_size",), None,
           {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32}),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", "silu", "head",
           {**_DENSE_NAMES, **_MLP_NAMES}, ("num_experts", "num_local_experts"),
           ("moe_intermediate_size",), "norm_topk_prob",
           {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
            "norm_topk_prob": False}),
    Family("olmoe", "OlmoeForCausalLM", "olmoe", "silu", "full",
           {**_DENSE_NAMES, **_MLP_NAMES}, ("num_experts", "num_local_experts"),
           ("intermediate_size",), "norm_topk_prob",
           {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
            "norm_topk_prob": False}),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", "silu", "none",
           _QWEN2_MOE_NAMES, ("num_experts",), ("moe_intermediate_size",), "norm_topk_prob",
           {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
            "norm_topk_prob": False, "qkv_bias": True, "decoder_sparse_step": 1,
            "shared_expert_intermediate_size": 5632, "intermediate_size": 5632},
           _qwen2_moe, frozenset({"qkv_bias", "mlp_only_layers", "decoder_sparse_step",
                                  "shared_expert_intermediate_size"})),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3", "silu", "none",
           _DEEPSEEK_NAMES, ("n_routed_experts", "num_local_experts"),
           ("moe_intermediate_size",), "norm_topk_prob",
           {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
            "norm_topk_prob": True, "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "rope_interleave": True, "n_group": 8, "topk_group": 4,
            "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 3,
            "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "n_routed_experts": 256, "num_experts_per_tok": 8},
           _deepseek_v3, frozenset({"n_shared_experts"})),
)}
assert tuple(FAMILY_TABLE) == FAMILIES
ARCHITECTURES = {f.architecture: f for f in FAMILY_TABLE.values()}
DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "bf16": "bfloat16",
          "float": "float32", "fp32": "float32"}


def _refuse(key: str, why: str) -> ConfigError:
    return ConfigError(f"config.json {key}", why)


def family_of(hf: dict) -> Family:
    """The family of a config.json (by ``architectures``, else ``model_type``)."""
    architectures = hf.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    by_type = {f.model_type: f for f in FAMILY_TABLE.values()}
    if not architectures and hf.get("model_type") in by_type:
        return by_type[hf["model_type"]]
    found = ", ".join(map(str, architectures)) or f"model_type {hf.get('model_type')!r}"
    raise _refuse("architectures", f"{found} is not supported (supported: "
                                   f"{', '.join(ARCHITECTURES)})")


def _get(hf: dict, family: Family, key: str, kind=int):
    value = hf.get(key, family.defaults.get(key))
    if value is None:
        raise _refuse(key, "missing")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _refuse(key, f"{value!r} must be an integer")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _refuse(key, f"{value!r} must be a number")
    return kind(value)


def _first(hf: dict, family: Family, keys: tuple[str, ...]) -> int:
    for key in keys:
        if hf.get(key) is not None:
            return _get(hf, family, key)
    if family.defaults.get(keys[0]) is not None:
        return _get(hf, family, keys[0])
    raise _refuse(keys[0], "missing")


def _flag(hf: dict, family: Family, key: str) -> bool:
    value = hf.get(key, family.defaults.get(key))
    if not isinstance(value, bool):
        raise _refuse(key, f"{value!r} must be true or false")
    return value


def _rope_spec(hf: dict) -> tuple[str, dict]:
    """(config key, parameters) of the RoPE variant: a non-empty ``rope_scaling`` (the
    older key) replaces ``rope_parameters``, as in transformers."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise _refuse("rope_parameters", f"{params!r} must be an object")
    scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise _refuse("rope_scaling", f"{scaling!r} must be an object or null")
    return ("rope_scaling", scaling) if scaling else ("rope_parameters", params)


def rope_theta(hf: dict, family: Family) -> float:
    """``rope_parameters.rope_theta`` (or ``rope_scaling``'s), else ``rope_theta``
    (transformers 5 writes the former). Only the default RoPE and YaRN are implemented
    (:func:`yarn`); anything else is refused, as is partial rotation."""
    key, spec = _rope_spec(hf)
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise _refuse(f"{key}.rope_type", f"{kind!r}: only the default RoPE and yarn are "
                                          "implemented")
    factor = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1 and factor is not None:
        raise _refuse("partial_rotary_factor", f"{factor!r}: only full-width RoPE (1.0) is "
                                               "implemented")
    theta = spec.get("rope_theta", hf.get("rope_theta", family.defaults.get("rope_theta")))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise _refuse("rope_theta", f"{theta!r} must be a positive number")
    return float(theta)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """transformers' ``get_mscale``: YaRN's attention temperature for a scaling factor."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn(hf: dict, family: Family) -> Yarn | None:
    """The YaRN scaling of a config (None for the default RoPE), with transformers'
    defaults: ``factor`` from ``max_position_embeddings / original_max_position_embeddings``
    when absent, ``attention_factor`` from ``mscale``/``mscale_all_dim`` (or the factor
    alone), betas 32 and 1, ``truncate`` true; DeepSeek-V3 also multiplies its softmax
    scale by ``yarn_mscale(factor, mscale_all_dim) ** 2``."""
    key, spec = _rope_spec(hf)
    if spec.get("rope_type", spec.get("type", "default")) != "yarn":
        return None

    def number(name: str, default=None, kind=float):
        value = spec.get(name, default)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value < math.inf:
            raise _refuse(f"{key}.{name}", f"{value!r} must be a finite number >= 0")
        return kind(value)

    original = hf.get("original_max_position_embeddings",
                      spec.get("original_max_position_embeddings",
                               _get(hf, family, "max_position_embeddings")))
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise _refuse(f"{key}.original_max_position_embeddings", f"{original!r} must be a "
                                                                 "positive integer")
    raw_factor = spec.get("factor")
    factor = (number("factor") if raw_factor is not None else
              _get(hf, family, "max_position_embeddings") / original)
    mscale, mscale_all = spec.get("mscale"), spec.get("mscale_all_dim")
    if spec.get("attention_factor") is not None:
        attention = number("attention_factor")
    elif mscale and mscale_all:
        attention = yarn_mscale(factor, number("mscale")) / yarn_mscale(
            factor, number("mscale_all_dim"))
    else:
        attention = yarn_mscale(factor)
    softmax = 1.0
    if family.name == "deepseek_v3" and mscale_all:
        softmax = yarn_mscale(factor, number("mscale_all_dim"))
    truncate = spec.get("truncate", True)
    if not isinstance(truncate, bool):
        raise _refuse(f"{key}.truncate", f"{truncate!r} must be true or false")
    return Yarn(factor=factor, original_max=original,
                beta_fast=number("beta_fast") if spec.get("beta_fast") else 32.0,
                beta_slow=number("beta_slow") if spec.get("beta_slow") else 1.0,
                truncate=truncate, attention_factor=attention, softmax_mscale=softmax)


def fp8_block(hf: dict) -> tuple[int, int] | None:
    """``quantization_config``: DeepSeek's FP8 (``quant_method`` fp8, ``fmt`` e4m3, a
    ``weight_block_size`` [rows, cols] per float32 scale) gives the block; no config gives
    None; any other quantisation is refused."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise _refuse("quantization_config.quant_method", f"{method!r}: only fp8 block "
                                                          "quantisation is implemented")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise _refuse("quantization_config.fmt", f"{quant['fmt']!r}: only e4m3 weights load")
    block = quant.get("weight_block_size")
    if not isinstance(block, list) or len(block) != 2 or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
        raise _refuse("quantization_config.weight_block_size", f"{block!r} must be two "
                                                               "positive integers")
    return (block[0], block[1])


def ignored(hf: dict) -> list[str]:
    """What a config holds that the engine leaves out on purpose, in words (said once, in
    the report's weights line and the plan's family line)."""
    mtp = hf.get("num_nextn_predict_layers") or 0
    return ([f"num_nextn_predict_layers {mtp}: multi-token-prediction weights ignored"]
            if isinstance(mtp, int) and mtp > 0 else [])


def _refuse_unimplemented(hf: dict, family: Family) -> None:
    """Refuse, naming the field, what would change the forward pass and is not done."""
    for key in ("attention_bias", "mlp_bias", "bias", "qkv_bias"):
        if hf.get(key) and key not in family.reads:
            raise _refuse(key, "true: biases are not implemented here (only bias-free "
                               "linears, and Qwen2-MoE's q/k/v biases)")
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True):
        raise _refuse("sliding_window", f"{window!r}: sliding-window attention is not "
                                        "implemented (only full causal attention)")
    layer_types = hf.get("layer_types") or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise _refuse("layer_types", f"{', '.join(map(str, other))}: only full_attention "
                                     "layers are implemented")
    if hf.get("clip_qkv") is not None:
        raise _refuse("clip_qkv", f"{hf['clip_qkv']!r}: q/k/v clipping is not implemented")
    if hf.get("mlp_only_layers") and "mlp_only_layers" not in family.reads:
        raise _refuse("mlp_only_layers", f"{hf['mlp_only_layers']!r}: dense (non-MoE) "
                                         f"layers are read for Qwen2-MoE only")
    step = hf.get("decoder_sparse_step", 1)
    if step != 1 and "decoder_sparse_step" not in family.reads:
        raise _refuse("decoder_sparse_step", f"{step!r}: every layer must be a MoE layer (1)")
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if hf.get(key) and key not in family.reads:
            raise _refuse(key, f"{hf[key]!r}: shared experts are read for Qwen2-MoE and "
                               "DeepSeek-V3 only")
    act = hf.get("hidden_act", family.hidden_act)
    if act != family.hidden_act:
        raise _refuse("hidden_act", f"{act!r}: {family.architecture} experts take "
                                    f"{family.hidden_act!r}")


def checkpoint_dtype(hf: dict) -> str | None:
    """The dtype config.json declares (``dtype``, or the older ``torch_dtype``) as one of
    ours; None for float16 (the caller asks for ``--dtype``); refuses anything else."""
    value = hf.get("dtype", hf.get("torch_dtype", "bfloat16"))
    text = str(value).replace("torch.", "").lower()
    if text in ("float16", "half", "fp16"):
        return None
    if text not in DTYPES:
        raise _refuse("dtype", f"{value!r} is not one of bfloat16, float32 (float16 with "
                               "--dtype)")
    return DTYPES[text]


def model_config_from_hf(hf: dict, dtype: str | None = None) -> ModelConfig:
    """A config.json (as a dict) -> our ModelConfig, validated. ``dtype`` overrides the
    checkpoint's (weights are converted on load)."""
    if not isinstance(hf, dict):
        raise _refuse("", "must hold a JSON object")
    check_field_types(hf)
    family = family_of(hf)
    _refuse_unimplemented(hf, family)
    ckpt_dtype = checkpoint_dtype(hf)
    if dtype is None and ckpt_dtype is None:
        raise _refuse("dtype", "float16 checkpoints need --dtype float32 or --dtype bfloat16 "
                               "(converted on load)")
    n_heads = _get(hf, family, "num_attention_heads")
    hidden = _get(hf, family, "hidden_size")
    n_layers = _get(hf, family, "num_hidden_layers")
    extra = family.reader(hf, family, n_layers) if family.reader is not None else {}
    head_dim = None if hf.get("head_dim") is None else _get(hf, family, "head_dim")
    if "d_head" in extra:
        head_dim = extra.pop("d_head")    # MLA: transformers writes head_dim = rope dim
    if head_dim is not None and head_dim * n_heads == hidden:
        head_dim = None            # the SPEC §1 default, d / H
    if family.name == "olmoe" and head_dim is not None:
        # transformers sizes OLMoE's k_norm from hidden_size / num_attention_heads.
        raise _refuse("head_dim", f"{hf['head_dim']!r}: OLMoE's head dim is hidden_size / "
                                  "num_attention_heads")
    renorm = True if family.renorm_key is None else hf.get(
        family.renorm_key, family.defaults.get(family.renorm_key))
    if not isinstance(renorm, bool):
        raise _refuse(family.renorm_key, f"{renorm!r} must be true or false")
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise _refuse("tie_word_embeddings", f"{tie!r} must be true or false")
    kv = hf.get("num_key_value_heads")
    kv = None if kv is None or extra.get("attention") == "mla" else _get(
        hf, family, "num_key_value_heads")
    if kv == n_heads:
        kv = None                  # the SPEC §1 default: as many as query heads
    model = ModelConfig(
        vocab_size=_get(hf, family, "vocab_size"),
        d_model=hidden,
        n_heads=n_heads,
        n_layers=n_layers,
        n_experts=_first(hf, family, family.experts_keys),
        d_ff=_first(hf, family, family.ff_keys),
        top_k=_get(hf, family, "num_experts_per_tok"),
        rope_theta=rope_theta(hf, family),
        norm_eps=_get(hf, family, "rms_norm_eps", float),
        dtype=dtype or ckpt_dtype,
        max_seq_len=_get(hf, family, "max_position_embeddings"),
        n_kv_heads=kv,
        d_head=head_dim,
        activation=family.activation,
        qk_norm=family.qk_norm,
        router_renorm=renorm,
        tie_word_embeddings=tie,
        family=family.name,
        yarn=yarn(hf, family),
        fp8_block=fp8_block(hf),
        **extra)
    try:
        return model.validate()
    except ConfigError as exc:
        keys = {**_HF_KEYS, "n_experts": family.experts_keys[0], "d_ff": family.ff_keys[0]}
        raise _refuse(keys.get(exc.field, exc.field), exc.message) from None


# Our field -> the config.json key, for errors found by ModelConfig.validate.
_HF_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size",
            "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
            "n_experts": "num_experts", "d_ff": "intermediate_size",
            "top_k": "num_experts_per_tok", "norm_eps": "rms_norm_eps",
            "max_seq_len": "max_position_embeddings", "n_kv_heads": "num_key_value_heads",
            "d_head": "head_dim", "rope_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
            "kv_lora_rank": "kv_lora_rank", "q_lora_rank": "q_lora_rank",
            "n_group": "n_group", "topk_group": "topk_group",
            "routed_scale": "routed_scaling_factor", "d_ff_dense": "intermediate_size"}


# The variant fields a family reader sets, at their SPEC §1 values.
_VARIANT_DEFAULTS = {f.name: f.default for f in fields(ModelConfig)
                     if f.name in ("qkv_bias", "attention", "q_lora_rank", "kv_lora_rank",
                                   "rope_dim", "v_head_dim", "rope_interleave", "yarn",
                                   "router_score", "router_bias", "n_group", "topk_group",
                                   "routed_scale", "d_shared", "shared_gate", "dense_layers",
                                   "d_ff_dense", "fp8_block")}
SIMPLE_FAMILIES = ("spmd", "mixtral", "qwen3_moe", "olmoe")


def hf_config(model: ModelConfig) -> dict:
    """config.json for ``model`` in its family's format (``spmd-moe export``)."""
    family = FAMILY_TABLE[model.family]
    expected = (family.activation, family.qk_norm)
    if family.reader is not None or model != replace(
            model, **{f: v for f, v in _VARIANT_DEFAULTS.items()}):
        raise ConfigError("family", f"export writes the {', '.join(SIMPLE_FAMILIES)} formats, "
                                    f"not {model.family}'s or its variants")
    if (model.activation, model.qk_norm) != expected or (
            family.renorm_key is None and not model.router_renorm):
        raise ConfigError("family", f"the model's activation/qk_norm/router_renorm are not "
                                    f"those of the {family.name} family")
    hf = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "num_hidden_layers": model.n_layers,
        family.experts_keys[0]: model.n_experts,
        family.ff_keys[0]: model.d_ff,
        "num_experts_per_tok": model.top_k,
        "hidden_act": family.hidden_act,
        "rope_theta": model.rope_theta,
        "rms_norm_eps": model.norm_eps,
        "max_position_embeddings": model.max_seq_len,
        "tie_word_embeddings": model.tie_word_embeddings,
        "dtype": model.dtype,
    }
    if family.renorm_key is not None:
        hf[family.renorm_key] = model.router_renorm
    return hf


# --- tensors -------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointTensor:
    """Where one of our tensors lives in a checkpoint: its name there, its shape there
    (``[out, in]`` for matrices), and whether ours is its transpose."""

    name: str
    shape: tuple[int, ...]
    transposed: bool


def tensor_location(model: ModelConfig, ours: str) -> CheckpointTensor:
    """Our tensor ``ours`` (e.g. ``layers.2.experts.5.w3``) in ``model``'s checkpoint. With
    tied embeddings the LM head is the embedding table, transposed."""
    family = FAMILY_TABLE[model.family]
    key = tensor_family(ours)
    matrices, gains = tensor_shapes(model), gain_shapes(model)
    if key == "lm_head" and model.tie_word_embeddings:
        return CheckpointTensor(family.names["embed"], matrices["embed"][0], True)
    parts = ours.split(".")
    fill = {"l": parts[1] if parts[0] == "layers" else "",
            "e": parts[3] if len(parts) > 3 and parts[2] == "experts" else ""}
    name = family.names[key].format(**fill)
    if key in gains:
        return CheckpointTensor(name, gains[key], False)
    if key == "embed":
        return CheckpointTensor(name, matrices[key][0], False)
    return CheckpointTensor(name, matrices[key][0][::-1], True)


def checkpoint_tensors(model: ModelConfig) -> Iterator[tuple[str, CheckpointTensor]]:
    """Every tensor of ``model`` as (our name, where it lives), in a fixed order: the
    embedding, each layer (attention, norms, router, experts), final norm, LM head (absent
    when tied: the embedding serves). A generator: a check that stops at the first missing
    tensor never lists a model of 20,000 layers x 2,000 experts."""
    yield "embed", tensor_location(model, "embed")
    for layer in range(model.n_layers):
        per_layer, per_expert = layer_keys(model, layer)
        for key in per_layer:
            ours = key.format(l=layer)
            yield ours, tensor_location(model, ours)
        for expert in range(model.n_experts if per_expert else 0):
            for key in per_expert:
                ours = key.format(l=layer, e=expert)
                yield ours, tensor_location(model, ours)
    yield "final_norm", tensor_location(model, "final_norm")
    if not model.tie_word_embeddings:
        yield "lm_head", tensor_location(model, "lm_head")


# --- config.json field types -----------------------------------------------------------

# The JSON type of every config.json key a family reads (core/files.JSON_KINDS; null is
# absent). Checked before any is used, so no reader meets a list where it wants a name.
CONFIG_TYPES = {
    "architectures": "string|strings", "model_type": "string", "hidden_act": "string",
    "dtype": "string", "torch_dtype": "string", "layer_types": "strings",
    **dict.fromkeys(("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "num_hidden_layers", "num_local_experts", "num_experts",
                     "intermediate_size", "moe_intermediate_size", "num_experts_per_tok",
                     "max_position_embeddings", "sliding_window", "decoder_sparse_step",
                     "shared_expert_intermediate_size", "n_shared_experts",
                     "num_shared_experts"), "integer"),
    **dict.fromkeys(("rope_theta", "rms_norm_eps", "partial_rotary_factor", "clip_qkv"),
                    "number"),
    **dict.fromkeys(("tie_word_embeddings", "norm_topk_prob", "attention_bias", "mlp_bias",
                     "bias", "use_sliding_window"), "boolean"),
    **dict.fromkeys(("rope_parameters", "rope_scaling", "quantization_config"), "object"),
    "mlp_only_layers": "integers", "eos_token_id": "integer|integers",
}


def check_field_types(hf: dict) -> None:
    """Refuse, naming the key, a config.json field of the wrong JSON type (CONFIG_TYPES)."""
    for key, kind in CONFIG_TYPES.items():
        if hf.get(key) is not None:
            check_json(hf[key], kind, f"config.json {key}", error=ConfigError)
