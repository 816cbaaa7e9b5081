"""Configuration: the model (SPEC §1), the workload, the parallel layout (SPEC §2).

Frozen dataclasses, validated in one place each (``validate``), with errors that name the
field and the allowed values. Sources, later ones winning: a built-in preset, a JSON file
(SPEC field names flat or under ``"model"``, the seed paper's own names as aliases, batch
and sequence length under ``"input"``), then ``--set key=value`` overrides.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError, LayoutError
from .files import read_json

DTYPES = ("bfloat16", "float32")
# Sizes and counts are C ints on their way through MPI (counts) and int32 indices: larger
# values are refused as a field error before any arithmetic sees them.
MAX_COUNT = 2 ** 31 - 1
WORKLOADS = ("prefill", "decode")
INITS = ("host", "device")
# What a model family may change (families.py maps checkpoint formats onto these).
ACTIVATIONS = ("gelu", "swiglu")     # GELU(x W1) W2  |  (silu(x W1) * x W3) W2
QK_NORMS = ("none", "head", "full")  # no q/k norm | RMSNorm per head | over the projection
FAMILIES = ("spmd", "mixtral", "qwen3_moe", "olmoe", "qwen2_moe",   # SPEC §1's, then §8's
            "deepseek_v3")
ATTENTIONS = ("mha", "mla")          # multi-head (grouped-query) | multi-head latent
ROUTER_SCORES = ("softmax", "sigmoid")
OVERLAPS = ("auto", "on", "off")
OVERLAP_ALIASES = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off",
                   "0": "off"}


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling (``rope_scaling`` of type ``yarn``), as transformers computes it:
    frequencies blended between ``theta^(-2j/R)`` (fast dims) and that over ``factor``
    (slow dims), ramped between the dims that make ``beta_fast`` and ``beta_slow``
    rotations in ``original_max`` positions (floored/ceiled when ``truncate``); cos and sin
    times ``attention_factor``; the softmax scale times ``softmax_mscale ** 2`` (DeepSeek's
    ``mscale_all_dim``; 1 elsewhere)."""

    factor: float
    original_max: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    softmax_mscale: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The transformer of SPEC §1, and the differences of the checkpoint families (SPEC §8).

    The defaults are SPEC §1's model: ``head_dim = d_model / n_heads``, as many key/value
    heads as query heads, GELU experts, no q/k norm, renormalised top-k weights, an untied
    LM head. A family (families.py) changes only these fields:

    - ``n_kv_heads``: key/value heads (grouped-query attention: query head h uses key/value
      head ``h // (n_heads / n_kv_heads)``); None means ``n_heads``.
    - ``d_head``: head dim when it is not ``d_model / n_heads`` (Qwen3-MoE); None means that.
    - ``activation``: ``gelu`` (``GELU(x W1) W2``) or ``swiglu`` (``(silu(x W1) * x W3) W2``).
    - ``qk_norm``: ``none``; ``head`` (RMSNorm over each head of q and k, one gain of
      ``head_dim``); ``full`` (RMSNorm over the whole q and k projections).
    - ``router_renorm``: divide the top-k probabilities by their sum (SPEC §1) or not.
    - ``tie_word_embeddings``: the LM head is the embedding table transposed.
    - ``family``: which checkpoint format names the tensors (families.FAMILIES).

    Attention variants: ``qkv_bias`` (q/k/v projections with biases: Qwen2-MoE);
    ``attention`` ``mla`` (DeepSeek-V3's multi-head latent attention: queries from
    ``q_lora_rank`` (0: one projection), keys and values from a ``kv_lora_rank`` latent
    and one shared rope key; ``d_head`` is the query/key width, nope + ``rope_dim``,
    ``v_head_dim`` the value width); ``rope_dim`` (the rotated width, default the head
    dim); ``rope_interleave`` (rotate pairs (2j, 2j+1), not halves); ``yarn`` (RoPE
    scaling). MoE variants: ``router_score`` ``sigmoid`` (DeepSeek: selection on the
    scores plus a per-expert bias when ``router_bias``, within the ``topk_group`` best of
    ``n_group`` groups), ``routed_scale`` (times the routed weights); ``d_shared`` (a
    shared SwiGLU expert of that width on every token, gated by ``sigmoid(x W_sg)`` when
    ``shared_gate``); ``dense_layers`` (layers with a dense SwiGLU MLP of ``d_ff_dense``
    instead of experts). ``fp8_block``: the checkpoint's weights are float8 with a scale
    per block of this size, dequantised at load.
    """

    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    n_experts: int
    d_ff: int
    top_k: int = 2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "bfloat16"
    max_seq_len: int = 4096
    n_kv_heads: int | None = None
    d_head: int | None = None
    activation: str = "gelu"
    qk_norm: str = "none"
    router_renorm: bool = True
    tie_word_embeddings: bool = False
    family: str = "spmd"
    qkv_bias: bool = False
    attention: str = "mha"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = False
    yarn: Yarn | None = None
    router_score: str = "softmax"
    router_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scale: float = 1.0
    d_shared: int = 0
    shared_gate: bool = False
    dense_layers: tuple[int, ...] = ()
    d_ff_dense: int = 0
    fp8_block: tuple[int, int] | None = None

    @property
    def head_dim(self) -> int:
        """Query/key width per head (MLA: nope + rope)."""
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def v_dim(self) -> int:
        """Value (and attention output) width per head."""
        return self.v_head_dim if self.v_head_dim is not None else self.head_dim

    @property
    def rope_width(self) -> int:
        """The rotated part of each query/key head (its last ``rope_width`` columns)."""
        return self.rope_dim if self.rope_dim is not None else self.head_dim

    @property
    def nope_dim(self) -> int:
        """The unrotated part of each query/key head (MLA's qk_nope_head_dim; 0 for MHA)."""
        return self.head_dim - self.rope_width

    @property
    def kv_heads(self) -> int:
        """Key/value heads (MLA: 1, the latent shared by every query head)."""
        if self.attention == "mla":
            return 1
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def cache_width(self) -> int:
        """Numbers the KV cache holds per token and layer: keys and values of the K/V heads
        (2 H_kv Dh), or MLA's latent and rope key (kv_lora_rank + rope_dim)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.rope_width
        return 2 * self.kv_width

    @property
    def o_width(self) -> int:
        """Width of the attention output before the output projection: H * Dv."""
        return self.n_heads * self.v_dim

    def is_dense(self, layer: int) -> bool:
        """Whether ``layer`` has a dense MLP instead of experts."""
        return layer in self.dense_layers

    @property
    def moe_layers(self) -> int:
        return self.n_layers - len(self.dense_layers)

    @property
    def q_width(self) -> int:
        """Width of the query projection (and of the attention output): H * Dh."""
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of the key and of the value projection: H_kv * Dh."""
        return self.kv_heads * self.head_dim

    @property
    def expert_matrices(self) -> int:
        """Weight matrices per expert: W1, W2 (GELU) and W3 (SwiGLU)."""
        return 3 if self.activation == "swiglu" else 2

    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "n_experts", "d_ff",
                     "top_k", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        for name in ("n_kv_heads", "d_head"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.d_head is None and self.d_model % self.n_heads:
            raise ConfigError("d_model", f"{self.d_model} must be divisible by "
                                         f"n_heads={self.n_heads}")
        if self.attention == "mha" and self.head_dim % 2:
            field_name = "d_head" if self.d_head is not None else "n_heads"
            raise ConfigError(field_name, f"head dim {self.head_dim} must be even (RoPE "
                                          "rotates halves)")
        if self.n_heads % self.kv_heads:
            raise ConfigError("n_kv_heads", f"{self.kv_heads} must divide n_heads="
                                            f"{self.n_heads} (query heads share key/value "
                                            "heads in equal groups)")
        if self.top_k > self.n_experts:
            raise ConfigError("top_k", f"{self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name, allowed in (("activation", ACTIVATIONS), ("qk_norm", QK_NORMS),
                              ("family", FAMILIES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"{getattr(self, name)!r} is not one of "
                                        f"{', '.join(allowed)}")
        for name in ("router_renorm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"{getattr(self, name)!r} must be true or false")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 < value < math.inf:
                raise ConfigError(name, f"{value!r} must be a finite positive number")
        self._validate_variants()
        return self

    def _validate_variants(self) -> None:
        """The attention and MoE variants of the checkpoint families (SPEC §8)."""
        for name, allowed in (("attention", ATTENTIONS), ("router_score", ROUTER_SCORES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"{getattr(self, name)!r} is not one of "
                                        f"{', '.join(allowed)}")
        for name in ("qkv_bias", "rope_interleave", "router_bias", "shared_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"{getattr(self, name)!r} must be true or false")
        for name in ("q_lora_rank", "kv_lora_rank", "d_shared", "d_ff_dense"):
            _count(name, getattr(self, name))
        for name in ("rope_dim", "v_head_dim"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.attention == "mla":
            if self.kv_lora_rank < 1 or self.rope_dim is None:
                raise ConfigError("kv_lora_rank", "multi-head latent attention needs "
                                                  "kv_lora_rank >= 1 and rope_dim")
            if self.qkv_bias or self.qk_norm != "none":
                raise ConfigError("attention", "mla takes no q/k/v biases or q/k norms")
        elif self.q_lora_rank or self.kv_lora_rank:
            raise ConfigError("kv_lora_rank", "low-rank projections need attention=mla")
        if self.rope_width % 2 or self.rope_width > self.head_dim:
            raise ConfigError("rope_dim", f"{self.rope_width} must be even and at most the "
                                          f"head dim {self.head_dim}")
        if self.attention == "mha" and self.rope_width != self.head_dim:
            raise ConfigError("rope_dim", "partial rotation is implemented for mla only")
        for name in ("n_group", "topk_group"):
            _positive_int(name, getattr(self, name))
        if self.n_experts % self.n_group:
            raise ConfigError("n_group", f"{self.n_group} must divide n_experts="
                                         f"{self.n_experts}")
        per_group = self.n_experts // self.n_group
        if self.topk_group > self.n_group:
            raise ConfigError("topk_group", f"{self.topk_group} must be in [1, n_group="
                                            f"{self.n_group}]")
        if self.n_group > 1 and per_group < 2:
            raise ConfigError("n_group", f"{self.n_group} groups of {per_group} expert: a "
                                         "group's score sums its two best")
        if self.top_k > self.topk_group * per_group:
            raise ConfigError("top_k", f"{self.top_k} is more than the {self.topk_group} "
                                       f"kept groups of {per_group} experts hold")
        if self.router_score == "softmax" and (self.router_bias or self.n_group > 1):
            raise ConfigError("router_bias", "selection bias and expert groups need "
                                             "router_score=sigmoid")
        value = self.routed_scale
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 < value < math.inf:
            raise ConfigError("routed_scale", f"{value!r} must be a finite positive number")
        if self.shared_gate and not self.d_shared:
            raise ConfigError("shared_gate", "a shared-expert gate needs d_shared > 0")
        layers = self.dense_layers
        if not isinstance(layers, tuple) or any(
                isinstance(l, bool) or not isinstance(l, int) for l in layers) or \
                list(layers) != sorted(set(layers)) or \
                any(not 0 <= l < self.n_layers for l in layers):
            raise ConfigError("dense_layers", f"{layers!r} must be distinct layer indices in "
                                              f"[0, n_layers={self.n_layers}), ascending")
        if layers and self.d_ff_dense < 1:
            raise ConfigError("d_ff_dense", "dense layers need d_ff_dense >= 1")
        if self.fp8_block is not None and (
                not isinstance(self.fp8_block, tuple) or len(self.fp8_block) != 2 or any(
                    isinstance(b, bool) or not isinstance(b, int) or b < 1
                    for b in self.fp8_block)):
            raise ConfigError("fp8_block", f"{self.fp8_block!r} must be two positive "
                                           "integers")
        if self.yarn is not None:
            yarn = self.yarn
            numbers = (yarn.factor, yarn.beta_fast, yarn.beta_slow, yarn.attention_factor,
                       yarn.softmax_mscale)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and 0 < v < math.inf for v in numbers) or yarn.original_max < 1:
                raise ConfigError("yarn", f"{yarn!r}: factors, betas and scales must be "
                                          "finite positive numbers, original_max >= 1")


@dataclass(frozen=True)
class WorkloadConfig:
    """What is run: a batch of ``batch_size`` sequences of ``seq_len`` tokens.

    ``pad_fraction`` left-pads synthetic inputs (see data.synthetic_input). ``decode``
    generates ``new_tokens`` tokens per sequence after the prefill; a sequence stops early
    at ``eos_id`` when one is set.

    Prefill micro-batches (chunks.py): chunks of at most ``chunk_tokens`` tokens per rank
    (0: the derived default), or, when ``micro_batches`` > 0, that many groups of whole
    sequences per rank. Decode steps use ``micro_batches`` groups (0: one per stage).
    ``overlap``: two micro-batches in flight on a stage, one's exchanges running while the
    other computes (overlap.py): ``auto`` where it pays (chunks.overlap_pays), ``on``
    wherever a stage has several ranks and two micro-batches, ``off``.
    """

    batch_size: int = 1
    seq_len: int = 16
    pad_fraction: float = 0.0
    workload: str = "prefill"
    new_tokens: int = 0
    eos_id: int | None = None
    micro_batches: int = 0
    chunk_tokens: int = 0
    overlap: str = "auto"

    def validate(self, model: ModelConfig) -> "WorkloadConfig":
        _positive_int("batch_size", self.batch_size)
        _positive_int("seq_len", self.seq_len)
        if not isinstance(self.pad_fraction, (int, float)) or not 0 <= self.pad_fraction < 1:
            raise ConfigError("pad_fraction", f"{self.pad_fraction!r} must be in [0, 1)")
        if self.workload not in WORKLOADS:
            raise ConfigError("workload", f"{self.workload!r} is not one of "
                                          f"{', '.join(WORKLOADS)}")
        _count("new_tokens", self.new_tokens)
        if self.workload == "decode" and self.new_tokens < 1:
            raise ConfigError("new_tokens", "decode needs new_tokens >= 1 (--new-tokens N)")
        if self.eos_id is not None and not (isinstance(self.eos_id, int)
                                            and 0 <= self.eos_id < model.vocab_size):
            raise ConfigError("eos_id", f"{self.eos_id!r} must be a token id in "
                                        f"[0, vocab_size={model.vocab_size})")
        _count("micro_batches", self.micro_batches,
               "(0: chunks for the prefill, one per pipeline stage for decode)")
        if self.micro_batches > self.batch_size:
            raise ConfigError("micro_batches", f"{self.micro_batches} is more than batch_size="
                                               f"{self.batch_size}: a micro-batch holds at least "
                                               "one sequence")
        _count("chunk_tokens", self.chunk_tokens, "(0: the default chunk size)")
        if self.chunk_tokens and self.micro_batches:
            raise ConfigError("chunk_tokens", f"{self.chunk_tokens} chunk tokens and "
                                              f"micro_batches={self.micro_batches} both set: "
                                              "give one (micro_batches: whole sequences)")
        if self.overlap not in OVERLAPS:
            raise ConfigError("overlap", f"{self.overlap!r} is not one of {', '.join(OVERLAPS)}")
        check_sequence_fits(model, self.seq_len, self.new_tokens if self.workload == "decode"
                            else 0, field_name="seq_len")
        return self


def check_sequence_fits(model: ModelConfig, prompt_len: int, new_tokens: int,
                        field_name: str, new_tokens_field: str = "new_tokens") -> None:
    """Refuse prompts that, with the tokens asked for, outgrow ``max_seq_len``: the error
    names ``field_name`` (the prompt's source) when the prompt alone does not fit, else
    ``new_tokens_field``."""
    if prompt_len + new_tokens > model.max_seq_len:
        extra = f" + new_tokens {new_tokens}" if new_tokens else ""
        if new_tokens and prompt_len <= model.max_seq_len:
            field_name = new_tokens_field
        raise ConfigError(field_name, f"prompt length {prompt_len}{extra} = "
                                      f"{prompt_len + new_tokens} exceeds max_seq_len="
                                      f"{model.max_seq_len}")


@dataclass(frozen=True)
class Layout:
    """How ranks are arranged (SPEC §2): ``pp`` stages, each of ``ep`` expert-parallel or
    ``tp`` tensor-parallel ranks. World rank ``r`` sits in stage ``r // group``, group rank
    ``r % group`` where ``group = ep * tp`` (one of the two is 1)."""

    ep: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def group(self) -> int:
        return self.ep * self.tp

    @property
    def world_size(self) -> int:
        return self.pp * self.group

    @property
    def kind(self) -> str:
        return "tp" if self.tp > 1 else "ep"

    def __str__(self) -> str:
        if self.tp > 1:
            return f"tp={self.tp},pp={self.pp}"
        return f"ep={self.ep},pp={self.pp}"

    @classmethod
    def parse(cls, text: str | None, world_size: int) -> "Layout":
        """``"ep=4,pp=2"`` or ``"tp=8,pp=2"``; missing parts are filled from the world size
        (default: ``ep`` = world size, ``pp`` = 1). ``tp=1`` (or ``ep=1``) means none of
        that kind of parallelism, so ``ep=2,tp=1`` is ``ep=2``. A key given twice, or ``ep``
        and ``tp`` both above 1, is refused: the layout run is always the layout asked."""
        parts: dict[str, int] = {}
        for item in (text or "").replace(" ", "").split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if key not in ("ep", "tp", "pp") or not sep:
                raise LayoutError("layout", f"{item!r}: expected ep=N, tp=N and/or pp=N, "
                                            "e.g. 'ep=4,pp=2' or 'tp=8,pp=2'")
            if key in parts:
                raise LayoutError("layout", f"{text!r} gives {key} twice")
            try:
                parts[key] = int(value)
            except ValueError:
                raise LayoutError("layout", f"{item!r}: {value!r} is not an integer") from None
            if parts[key] < 1:
                raise LayoutError("layout", f"{key}={parts[key]} must be >= 1")
            if parts[key] > MAX_COUNT:
                raise LayoutError("layout", f"{key}={parts[key]} is too large")
        ep, tp = parts.get("ep"), parts.get("tp")
        if (ep or 1) > 1 and (tp or 1) > 1:
            raise LayoutError("layout", "use either ep (expert parallel) or tp (tensor "
                                        "parallel baseline) within a stage, not both")
        # The group within a stage: whichever of ep/tp is above 1, else 1 if either is given.
        group = max(ep or 0, tp or 0) or None
        pp = parts.get("pp")
        if pp is None:
            pp = world_size // group if group and world_size % group == 0 else 1
        if group is None:
            group = world_size // pp if world_size % pp == 0 else 1
        if (tp or 1) > 1:
            return cls(ep=1, tp=group, pp=pp)
        return cls(ep=group, tp=1, pp=pp)

    def validate(self, model: ModelConfig, world_size: int) -> "Layout":
        if self.world_size != world_size:
            raise LayoutError("layout", f"{self} needs pp*{self.kind} = {self.world_size} "
                                        f"ranks but the world size is {world_size}")
        if model.n_experts % self.ep:
            raise LayoutError("layout", f"ep={self.ep} must divide n_experts="
                                        f"{model.n_experts}")
        if model.n_heads % self.tp:
            raise LayoutError("layout", f"tp={self.tp} must divide n_heads={model.n_heads}")
        if model.kv_heads % self.tp and self.tp % model.kv_heads:
            # Each rank's query heads must use whole key/value heads: a block of them
            # (tp divides H_kv) or one, replicated on tp/H_kv ranks (H_kv divides tp).
            raise LayoutError("layout", f"tp={self.tp} must divide n_kv_heads="
                                        f"{model.kv_heads} or be a multiple of it")
        for name in ("d_ff", "d_shared", "d_ff_dense"):
            if getattr(model, name) % self.tp:
                raise LayoutError("layout", f"tp={self.tp} must divide {name}="
                                            f"{getattr(model, name)}")
        if self.pp > model.n_layers:
            raise LayoutError("layout", f"pp={self.pp} stages is more than n_layers="
                                        f"{model.n_layers}")
        return self


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides the communicator: model, workload, seed, init mode.

    ``layout`` is the text given by the preset, file or command line (resolved against the
    world size by :meth:`Layout.parse`). ``init="device"`` draws weights on the device with
    the backend's own generator: fast at paper size, but NOT the weights of SPEC §1.
    ``checkpoint``: a Hugging Face model directory whose safetensors hold the weights
    (``--model DIR``, SPEC §8); None for generated weights.
    """

    model: ModelConfig
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    layout: str | None = None
    seed: int = 0
    init: str = "host"
    checkpoint: str | None = None

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.workload.validate(self.model)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("seed", f"{self.seed!r} must be an integer >= 0")
        if self.init not in INITS:
            raise ConfigError("init", f"{self.init!r} is not one of {', '.join(INITS)}")
        return self


# --- presets -------------------------------------------------------------------------

PRESETS: dict[str, RunConfig] = {
    # Odd, small sizes that catch indexing mistakes; E=12 divides among 1, 2, 3, 4, 6 ranks
    # and 5 layers allow up to 5 stages (pp=4 x ep=4 on 16 ranks), not evenly.
    "tiny": RunConfig(
        ModelConfig(vocab_size=101, d_model=32, n_heads=4, n_layers=5, n_experts=12, d_ff=40,
                    max_seq_len=64),
        WorkloadConfig(batch_size=5, seq_len=11)),
    # A CPU demo: a few seconds per forward at 4 ranks.
    "small": RunConfig(
        ModelConfig(vocab_size=2048, d_model=256, n_heads=8, n_layers=4, n_experts=8,
                    d_ff=1024, max_seq_len=1024),
        WorkloadConfig(batch_size=8, seq_len=256)),
    # The paper's model and batch (SPEC §1), deployed expert-parallel.
    "paper": RunConfig(
        ModelConfig(vocab_size=100256, d_model=4096, n_heads=32, n_layers=16, n_experts=16,
                    d_ff=16384, max_seq_len=16384),
        WorkloadConfig(batch_size=128, seq_len=10000)),
}
PRESETS["paper-baseline"] = replace(PRESETS["paper"], layout="tp=8,pp=2")

# --- loading -------------------------------------------------------------------------

# The seed paper's JSON names (SPEC §5) and a few spellings users type.
ALIASES = {
    "num_layers": "n_layers", "experts_per_layer": "n_experts",
    "token_dimension": "d_model", "mlp_hidden_size": "d_ff", "attention_heads": "n_heads",
    "precision": "dtype", "sequence_length": "seq_len", "vocab": "vocab_size",
    "num_experts": "n_experts", "hidden_size": "d_model", "batch": "batch_size",
    "head_dim": "d_head", "num_key_value_heads": "n_kv_heads",
}
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32",
                 "float32": "float32", "f32": "float32"}
MODEL_FIELDS = {f.name: f for f in fields(ModelConfig)}
WORKLOAD_FIELDS = {f.name: f for f in fields(WorkloadConfig)}
RUN_FIELDS = {"seed", "init", "layout"}


def _count(name: str, value: Any, note: str = "", least: int = 0) -> None:
    """An integer in ``[least, MAX_COUNT]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ConfigError(name, f"{value!r} must be {kind}" + (f" {note}" if note else ""))
    if value > MAX_COUNT:
        raise ConfigError(name, f"{value} is too large (at most {MAX_COUNT})")


def _positive_int(name: str, value: Any) -> None:
    _count(name, value, least=1)


def _coerce(key: str, value: Any) -> Any:
    """Turn a JSON or ``--set`` value into the field's type, naming the field on failure."""
    if key == "overlap":
        text = str(value).strip().lower()
        return OVERLAP_ALIASES.get(text, text)
    if key in ("yarn", "fp8_block"):
        raise ConfigError(key, "is read from a checkpoint's config.json (--model)")
    if key == "dense_layers":
        items = value if isinstance(value, (list, tuple)) else [
            v for v in str(value).replace(" ", "").strip("[]()").split(",") if v]
        try:
            return tuple(int(v) for v in items)
        except (TypeError, ValueError):
            raise ConfigError(key, f"{value!r} is not a list of layer indices") from None
    if key == "dtype":
        text = str(value).lower()
        if text not in DTYPE_ALIASES:
            raise ConfigError("dtype", f"{value!r} is not one of {', '.join(DTYPES)}")
        return DTYPE_ALIASES[text]
    spec = MODEL_FIELDS.get(key) or WORKLOAD_FIELDS.get(key)
    kind = spec.type if spec else {"seed": "int", "init": "str", "layout": "str"}[key]
    kind = str(kind)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if "None" in kind:
            return None
        raise ConfigError(key, "needs a value")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError
            return text in ("true", "1")
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"{value!r} is not a valid {kind.split(' ')[0]}") from None
    return str(value)


def _canonical(key: str) -> str:
    key = ALIASES.get(key, key)
    if key not in MODEL_FIELDS and key not in WORKLOAD_FIELDS and key not in RUN_FIELDS:
        known = sorted(set(MODEL_FIELDS) | set(WORKLOAD_FIELDS) | RUN_FIELDS)
        raise ConfigError(key, f"unknown setting; known: {', '.join(known)}")
    return key


def apply_settings(config: RunConfig, settings: dict[str, Any]) -> RunConfig:
    """Overlay ``{field: value}`` (SPEC or paper names) on ``config``; returns a new one."""
    model, workload, run = {}, {}, {}
    for raw_key, value in settings.items():
        key = _canonical(raw_key)
        value = _coerce(key, value)
        if key in MODEL_FIELDS:
            model[key] = value
        elif key in WORKLOAD_FIELDS:
            workload[key] = value
        else:
            run[key] = value
    return replace(config, model=replace(config.model, **model),
                   workload=replace(config.workload, **workload), **run)


def parse_set(items: list[str]) -> dict[str, str]:
    """``["d_model=64", "dtype=float32"]`` -> ``{"d_model": "64", "dtype": "float32"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", f"{item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def settings_from_json(data: Any, source: str) -> tuple[str | None, dict[str, Any]]:
    """Flatten a config document into ``(base preset, settings)``.

    Accepts SPEC names flat or under ``"model"``, ``"input"`` for the workload, and the seed
    paper's format as it is. The base preset is ``data["preset"]`` or ``"paper"``, so the
    paper's JSON, which names no vocabulary or top-k, gets the paper's.
    """
    if not isinstance(data, dict):
        raise ConfigError(source, "a config file must hold a JSON object")
    data = dict(data)
    preset = data.pop("preset", None)
    settings: dict[str, Any] = {}
    for section in ("model", "input", "workload", "run"):
        # "workload" is also a flat field ("prefill" | "decode"): only objects are sections.
        if isinstance(data.get(section), dict):
            settings.update(data.pop(section))
        elif section in ("model", "input", "run") and section in data:
            raise ConfigError(f"{source}: {section}", "must be a JSON object")
    layout = data.pop("layout", None)
    if isinstance(layout, dict):
        layout = ",".join(f"{k}={v}" for k, v in layout.items())
    if layout is not None:
        settings["layout"] = layout
    settings.update(data)
    return preset, settings


def read_config_file(path: str) -> Any:
    """The JSON document in ``path``, through the read door (files.read_json: a regular
    file of at most 1 MiB of UTF-8 JSON, bounded depth, finite numbers)."""
    return read_json(path, "--config", "config", error=ConfigError)


def build_run_config(preset: str | None = None, config_file: str | None = None,
                     sets: list[str] | None = None, **overrides: Any) -> RunConfig:
    """Preset, then file, then ``--set`` items, then keyword overrides; validated."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        file_preset, settings = settings_from_json(read_config_file(config_file), config_file)
        if preset is None:
            preset = file_preset or "paper"
    preset = preset or "tiny"
    if preset not in PRESETS:
        raise ConfigError("preset", f"{preset!r} is not one of {', '.join(PRESETS)}")
    settings.update(parse_set(sets or []))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return apply_settings(PRESETS[preset], settings).validate()


def to_dict(config: RunConfig) -> dict[str, Any]:
    """A JSON-able record of the config (for reports)."""
    return dataclasses.asdict(config)
