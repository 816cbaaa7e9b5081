"""The experts a rank holds: ``GELU(x W1) W2`` for the rows routed to each (SPEC §1), or
SwiGLU ``(silu(x W1) * x W3) W2`` (Mixtral, Qwen3-MoE, OLMoE: SPEC §8).

Rows arrive grouped by expert (dispatcher.py); ``tokens_per_expert`` says how many rows
each local expert has, in order. Under the TP baseline every rank holds every expert but
only its slice of F, and returns a partial sum that the dispatcher reduces.

Notation: R rows, d width, F hidden width (local slice under TP).
"""
from __future__ import annotations

import numpy as np

from ..backend.array import F32, Backend


def silu(bk: Backend, x):
    """``x * sigmoid(x)`` of float32 x, to float32 accuracy everywhere: the sigmoid from
    ``e = exp(-|x|)`` (never overflows) as ``1/(1+e)`` or ``e/(1+e)`` by sign (no
    cancellation for negative x, as ``(1 + tanh(x/2))/2`` would have)."""
    xp = bk.xp
    e = xp.exp(-xp.abs(x))
    return x * xp.where(x >= 0, np.float32(1.0), e) / (np.float32(1.0) + e)


def sigmoid(bk: Backend, x):
    """``1 / (1 + exp(-x))`` of float32 x with :func:`silu`'s stable branches (no
    overflow, no cancellation): DeepSeek's router scores, Qwen2-MoE's shared-expert gate."""
    xp = bk.xp
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, np.float32(1.0), e) / (np.float32(1.0) + e)


def expert_ffn(bk: Backend, x, w1, w2, out_dtype=None, w3=None):
    """x: [R, d] -> [R, d] in the storage dtype, or ``out_dtype`` (float32 for the TP
    baseline's partial sums, which are reduced before rounding). w1: [d, F], w2: [F, d];
    with w3 [d, F] the expert is SwiGLU, ``(silu(x W1) * x W3) W2``, else ``GELU(x W1) W2``.
    The activation (and SwiGLU's product) runs on the float32 accumulators of the first
    GEMMs before rounding, as a fused kernel does. With the fused kernels (GPU) both forms
    run there (kernels/fused.py: SwiGLU with these rounding points, GELU on the rounded
    hidden)."""
    if bk.kernels is not None:
        return bk.kernels.expert_ffn(x, w1, w2, out_dtype, w3=w3)
    if w3 is not None:
        gate = bk.matmul(x, w1, out_dtype=F32)                       # [R, F]
        up = bk.matmul(x, w3, out_dtype=F32)                         # [R, F]
        hidden = bk.store(silu(bk, gate) * up)
        return bk.matmul(hidden, w2, out_dtype=out_dtype)            # [R, d]
    hidden = bk.matmul(x, w1, out_dtype=F32)                         # [R, F]
    hidden = bk.store(bk.gelu(hidden, out=hidden))
    return bk.matmul(hidden, w2, out_dtype=out_dtype)                # [R, d]


def run_experts(bk: Backend, rows, tokens_per_expert_host: np.ndarray, experts: list[tuple],
                out_dtype=None):
    """rows: [R, d] grouped by expert -> [R, d]; ``experts[i]`` are the matrices of the
    i-th local expert, ``(w1, w2)`` or, SwiGLU, ``(w1, w2, w3)``; it owns the next
    ``tokens_per_expert_host[i]`` rows."""
    out = bk.xp.empty(rows.shape, dtype=out_dtype or rows.dtype)
    start = 0
    for matrices, count in zip(experts, tokens_per_expert_host):
        count = int(count)
        if count:
            w1, w2, *w3 = matrices
            rows_e, out_e = rows[start:start + count], out[start:start + count]
            if bk.kernels is not None:
                # The second GEMM writes the expert's rows of ``out`` in place: no copy.
                bk.kernels.expert_ffn(rows_e, w1, w2, out_dtype, w3=w3[0] if w3 else None,
                                      out=out_e)
            else:
                out_e[...] = expert_ffn(bk, rows_e, w1, w2, out_dtype, *w3)
        start += count
    assert start == rows.shape[0]
    return out
