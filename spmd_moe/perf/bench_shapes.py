"""The shapes a bench run measures (:class:`BenchShape`, the paper's by default: one rank of
16), the FLOPs and bytes of its layer step, SPEC §7's targets and the phases reported: the
engine's own (core/phases.py), since the bench runs the engine's layer.

Notation: B sequences, L tokens per sequence, T = B*L tokens, d width, H heads, Dh = d/H,
F expert hidden width, E experts, k top-k, R = T*k routed rows, P ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.costs import layer_flops
from ..core.errors import ConfigError
from ..core.phases import LAYER_COMPUTE_PHASES


# SPEC §7, for the report (the measured numbers sit beside them; nothing is asserted).
SPEC_TARGETS = {
    "paper_step_tflop": 60.2,
    "paper_floor_ms_at_790_tflops": 76.0,
    "pytorch_eager_step_ms_measured": 127.0,
    "step_vs_pytorch_eager": {"required": 1.0, "aim": 1.0 / 1.3},
    "attention_vs_sdpa": {"required": 1.4, "aim": 1.1},
    "expert_ffn_vs_two_gemms": {"required": 1.1, "aim": 1.1},
    "step_vs_floor": {"required": None, "aim": 1.0 / 0.8},
    "dispatch_combine_vs_raw_alltoallv": {"required": 1.2, "aim": 1.2},
}


# The layer step's phases: the engine's compute phases of a layer (its step is their sum);
# the loop-back's stand-ins for the exchanges are reported beside them, not in the step.
LAYER_PHASES = LAYER_COMPUTE_PHASES
LOOPBACK_PHASES = ("count_exchange", "dispatch", "combine")


TRANSPORT_PHASES = ("permute", "count_exchange", "dispatch", "combine", "unpermute")


@dataclass(frozen=True)
class BenchShape:
    """The sizes of one bench run (paper shapes by default)."""

    seqs: int = 8
    seq_len: int = 10000
    rows: int | None = None          # expert rows; default T*k
    d_model: int = 4096
    d_ff: int = 16384
    heads: int = 32
    experts: int = 16
    top_k: int = 2
    dtype: str = "bfloat16"
    family: object | None = None     # a checkpoint's ModelConfig (--model): its shapes win
    chunk_tokens: int | None = None  # prefill in chunks of this many tokens (engine's way)

    @property
    def tokens(self) -> int:
        return self.seqs * self.seq_len

    @property
    def routed_rows(self) -> int:
        return self.tokens * self.top_k

    @property
    def expert_rows(self) -> int:
        return self.routed_rows if self.rows is None else self.rows

    @property
    def head_dim(self) -> int:
        return self.family.head_dim if self.family is not None else self.d_model // self.heads

    @classmethod
    def for_model(cls, model, seqs: int, seq_len: int, rows: int | None,
                  dtype: str | None = None, chunk_tokens: int | None = None) -> "BenchShape":
        """One rank's layer step of a checkpoint's model (``--model``): its sizes and
        family; ``dtype`` defaults to the checkpoint's."""
        return cls(seqs, seq_len, rows, model.d_model, model.d_ff, model.n_heads,
                   model.n_experts, model.top_k, dtype or model.dtype, family=model,
                   chunk_tokens=chunk_tokens)

    @property
    def spec_layer(self) -> bool:
        """Whether this is SPEC §1's layer (what the PyTorch peer implements)."""
        model = self.model()
        return (model.kv_heads == model.n_heads and model.activation == "gelu"
                and model.qk_norm == "none" and model.q_width == model.d_model)

    def validate(self, layer_step: bool = True) -> "BenchShape":
        """Check the sizes (the attention's only for the layer step), naming the flag."""
        for flag, value in (("--seqs", self.seqs), ("--seq-len", self.seq_len),
                            ("--d-model", self.d_model), ("--d-ff", self.d_ff),
                            ("--heads", self.heads), ("--experts", self.experts),
                            ("--top-k", self.top_k), ("--rows", self.expert_rows),
                            ("--chunk-tokens", self.chunk_tokens or 1)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(flag, f"{value!r} must be a positive integer")
        if layer_step and self.family is None and (self.d_model % self.heads
                                                   or self.head_dim % 2):
            raise ConfigError("--heads", f"d_model={self.d_model} / heads={self.heads} must be "
                                         "a whole, even head dim")
        if self.top_k > self.experts:
            raise ConfigError("--top-k", f"{self.top_k} must be at most --experts="
                                         f"{self.experts}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ConfigError("--dtype", f"{self.dtype!r} is not one of bfloat16, float32")
        return self

    def model(self):
        """The one-layer model of these shapes (a tiny vocabulary: no embedding is timed)."""
        from dataclasses import replace

        from ..core.config import ModelConfig

        if self.family is not None:
            return replace(self.family, vocab_size=128, n_layers=1, dtype=self.dtype,
                           max_seq_len=self.seq_len, tie_word_embeddings=False).validate()
        return ModelConfig(vocab_size=128, d_model=self.d_model, n_heads=self.heads,
                           n_layers=1, n_experts=self.experts, d_ff=self.d_ff,
                           top_k=self.top_k, dtype=self.dtype,
                           max_seq_len=self.seq_len).validate()


def bench_flops(shape: BenchShape) -> dict[str, float]:
    """FLOPs of each layer-step phase (multiply-add = 2; elementwise work not counted), and
    of the attention core alone (``attention_core``, inside ``attention``): the engine's
    own count (costs.layer_flops). Paper shapes: 60.2 TFLOP, as SPEC §7 counts them."""
    model = shape.model()
    lengths = np.full(shape.seqs, shape.seq_len, dtype=np.int64)
    part = layer_flops(model, shape.tokens, lengths, model.n_heads, shape.expert_rows,
                       model.d_ff, model.kv_heads)
    flops = {phase: 0.0 for phase in LAYER_PHASES}
    flops["attention"] = part["attention_proj"] + part["attention_core"]
    flops["router"] = part["router"]
    flops["experts"] = part["experts"]
    flops["attention_core"] = part["attention_core"]
    return flops


def estimate_bytes(shape: BenchShape, on_gpu: bool) -> int:
    """A rough upper bound of the layer step's peak memory (checked before allocating)."""
    item = 2 if shape.dtype == "bfloat16" else 4
    param = item if on_gpu else 4
    model = shape.model()
    t, d, f = shape.tokens, shape.d_model, shape.d_ff
    wide, matrices = max(d, model.q_width), model.expert_matrices
    rows, routed = shape.expert_rows, shape.routed_rows
    weights = (2 * d * model.q_width + 2 * d * model.kv_width + d * shape.experts
               + matrices * d * f) * param
    if shape.chunk_tokens and shape.chunk_tokens < t:
        # One chunk's activations at a time, plus the input [T, d], its output and the
        # KV cache of every position.
        weights += t * d * item * 2 + 2 * t * model.kv_width * item
        t, rows, routed = shape.chunk_tokens, -(-rows * shape.chunk_tokens // t), \
            -(-routed * shape.chunk_tokens // t)
    activations = (t * wide * item * 10        # x, a, q, k, v, att, h, b, out, spare
                   + t * wide * 4 * 5          # float32 temporaries of norms, RoPE, residual
                   + routed * d * item * 3     # permuted rows, returned rows, un-permuted
                   + rows * d * item * 2       # expert input and output
                   + rows * f * (4 * matrices + item))  # float32 hidden(s), activation, stored
    attention = 2 * shape.seq_len * d * 4 + (64 << 20)   # generic path: one sequence's K, V
    return int(weights + activations + attention)


def stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
            "all": [float(v) for v in arr]}
