"""The experts a rank holds: ``GELU(x W1) W2`` for the rows routed to each (SPEC §1).

Rows arrive grouped by expert (dispatcher.py); ``tokens_per_expert`` says how many rows
each local expert has, in order. Under the TP baseline every rank holds every expert but
only its slice of F, and returns a partial sum that the dispatcher reduces.

Notation: R rows, d width, F hidden width (local slice under TP).
"""
from __future__ import annotations

import numpy as np

from .backend import F32, Backend


def expert_ffn(bk: Backend, x, w1, w2, out_dtype=None):
    """x: [R, d] -> [R, d] in the storage dtype, or ``out_dtype`` (float32 for the TP
    baseline's partial sums, which are reduced before rounding). The GELU runs on the
    float32 accumulator of the first GEMM before rounding, as a fused kernel does."""
    if bk.kernels is not None:
        return bk.kernels.expert_ffn(x, w1, w2, out_dtype)
    hidden = bk.matmul(x, w1, out_dtype=F32)                         # [R, F]
    hidden = bk.store(bk.gelu(hidden, out=hidden))
    return bk.matmul(hidden, w2, out_dtype=out_dtype)                # [R, d]


def run_experts(bk: Backend, rows, tokens_per_expert_host: np.ndarray,
                experts: list[tuple[object, object]], out_dtype=None):
    """rows: [R, d] grouped by expert -> [R, d]; ``experts[i]`` are the (w1, w2) of the
    i-th local expert, which owns the next ``tokens_per_expert_host[i]`` rows."""
    out = bk.xp.empty(rows.shape, dtype=out_dtype or rows.dtype)
    start = 0
    for (w1, w2), count in zip(experts, tokens_per_expert_host):
        count = int(count)
        if count:
            out[start:start + count] = expert_ffn(bk, rows[start:start + count], w1, w2,
                                                  out_dtype)
        start += count
    assert start == rows.shape[0]
    return out
