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

Checkpoint matrices are ``nn.Linear`` weights, ``[out, in]``; ours are ``[in, out]``
(``y = x W``): every 2-D tensor but the embedding is transposed on load.

Anything a config asks for that the engine does not implement (RoPE scaling, sliding
windows, biases, shared experts, dense layers, q/k/v clipping, quantisation) is refused with
an error naming the config.json field; unknown fields that do not change the forward pass
(dropout, initializer range, aux-loss coefficients) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from ..core.config import FAMILIES, ModelConfig
from ..core.errors import ConfigError
from ..core.files import check_json
from .weights import gain_shapes, tensor_family, tensor_shapes

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

    @property
    def activation(self) -> str:
        return "swiglu" if self.hidden_act == "silu" else "gelu"


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
    raise _refuse(keys[0], "missing")


def rope_theta(hf: dict, family: Family) -> float:
    """``rope_theta``, or ``rope_parameters.rope_theta`` (transformers 5 writes the latter);
    any RoPE variant but the default (rotate-half, no scaling) is refused."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise _refuse("rope_parameters", f"{params!r} must be an object")
    scaling = hf.get("rope_scaling")
    for key, spec in (("rope_scaling", scaling if isinstance(scaling, dict) else {}),
                      ("rope_parameters", params)):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise _refuse(f"{key}.rope_type", f"{kind!r}: only the default RoPE (no "
                                              "scaling) is implemented")
    if scaling is not None and not isinstance(scaling, dict):
        raise _refuse("rope_scaling", f"{scaling!r}: only null is implemented")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1 and factor is not None:
        raise _refuse("partial_rotary_factor", f"{factor!r}: only full-width RoPE (1.0) is "
                                               "implemented")
    theta = hf.get("rope_theta", params.get("rope_theta", family.defaults.get("rope_theta")))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise _refuse("rope_theta", f"{theta!r} must be a positive number")
    return float(theta)


def _refuse_unimplemented(hf: dict, family: Family) -> None:
    """Refuse, naming the field, what would change the forward pass and is not done."""
    if hf.get("quantization_config"):
        raise _refuse("quantization_config", "quantised checkpoints are not supported")
    for key in ("attention_bias", "mlp_bias", "bias"):
        if hf.get(key):
            raise _refuse(key, "true: biases are not implemented (only bias-free linears)")
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
    if hf.get("mlp_only_layers"):
        raise _refuse("mlp_only_layers", f"{hf['mlp_only_layers']!r}: dense (non-MoE) "
                                         "layers are not implemented")
    step = hf.get("decoder_sparse_step", 1)
    if step != 1:
        raise _refuse("decoder_sparse_step", f"{step!r}: every layer must be a MoE layer (1)")
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if hf.get(key):
            raise _refuse(key, f"{hf[key]!r}: shared experts are not implemented")
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
    head_dim = None if hf.get("head_dim") is None else _get(hf, family, "head_dim")
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
    kv = None if kv is None else _get(hf, family, "num_key_value_heads")
    if kv == n_heads:
        kv = None                  # the SPEC §1 default: as many as query heads
    model = ModelConfig(
        vocab_size=_get(hf, family, "vocab_size"),
        d_model=hidden,
        n_heads=n_heads,
        n_layers=_get(hf, family, "num_hidden_layers"),
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
        family=family.name)
    try:
        return model.validate()
    except ConfigError as exc:
        raise _refuse(_HF_KEYS.get(exc.field, exc.field), exc.message) from None


# Our field -> the config.json key, for errors found by ModelConfig.validate.
_HF_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size",
            "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
            "n_experts": "num_experts", "d_ff": "intermediate_size",
            "top_k": "num_experts_per_tok", "norm_eps": "rms_norm_eps",
            "max_seq_len": "max_position_embeddings", "n_kv_heads": "num_key_value_heads",
            "d_head": "head_dim"}


def hf_config(model: ModelConfig) -> dict:
    """config.json for ``model`` in its family's format (``spmd-moe export``)."""
    family = FAMILY_TABLE[model.family]
    expected = (family.activation, family.qk_norm)
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
    keys = list(tensor_shapes(model)) + list(gain_shapes(model))
    per_layer = [k for k in keys if k.startswith("layers.") and ".experts." not in k]
    per_expert = [k for k in keys if ".experts." in k]
    yield "embed", tensor_location(model, "embed")
    for layer in range(model.n_layers):
        for key in per_layer:
            ours = key.format(l=layer)
            yield ours, tensor_location(model, ours)
        for expert in range(model.n_experts):
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
