"""Top-k softmax router (SPEC §1), in float32.

``p = softmax(b Wr)``; the k largest p win, ties going to the lower expert index; the
winners' weights are renormalised to sum to one (SPEC §1, Mixtral, Qwen3-MoE with
``norm_topk_prob``) or kept as they are (OLMoE; ``ModelConfig.router_renorm``). Top-k is
k passes of argmax (which returns the first maximum, hence the tie rule) rather than a
sort: k is small, and both backends agree on argmax's tie behaviour, not on sort
stability. With the fused kernels everything after the GEMM is one launch
(kernels/rowwise.cu: router_topk, the same rule).

A token whose logits have no finite maximum (a NaN, +inf, or every one -inf) has no
softmax: on both paths it is routed to the sentinel expert ``E`` with weight 0, which the
dispatcher counts (its last bin) and refuses with the layer named (dispatcher.py), before
any row moves; nothing is gathered from outside the rows.

Notation: T tokens, d width, E experts, k top-k.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import F32, Backend


def route(bk: Backend, b, w_router, top_k: int, renormalize: bool = True):
    """b: [T, d] (storage dtype), w_router: [d, E] ->
    ``experts`` int32 [T, k] (best first) and ``weights`` float32 [T, k]: the winners'
    probabilities, divided by their sum when ``renormalize``; a token with non-finite
    logits gets expert ``E`` (the sentinel) and weight 0 (module docstring)."""
    logits = bk.matmul(b, w_router, out_dtype=F32)                    # [T, E]
    if bk.kernels is not None and bk.kernels.fuses("router"):
        return bk.kernels.route(logits, top_k, renormalize)           # one launch
    return select(bk, logits, top_k, renormalize)


def select(bk: Backend, logits, top_k: int, renormalize: bool = True):
    """What the router does after its GEMM, in array code: logits float32 [T, E] -> the
    ``experts`` int32 [T, k] and ``weights`` float32 [T, k] of :func:`route` (the fused
    router kernel's contract too)."""
    xp = bk.xp
    n_experts = logits.shape[1]
    top = logits.max(axis=-1, keepdims=True)                          # [T, 1]
    probs = xp.exp(logits - top)
    probs /= probs.sum(axis=-1, keepdims=True)
    n_tokens = probs.shape[0]
    rows = xp.arange(n_tokens)
    experts = xp.empty((n_tokens, top_k), dtype=np.int32)
    chosen = xp.empty((n_tokens, top_k), dtype=F32)
    remaining = probs.copy()
    for j in range(top_k):
        best = xp.argmax(remaining, axis=-1)                          # [T]
        experts[:, j] = best
        chosen[:, j] = probs[rows, best]
        remaining[rows, best] = -np.inf
    if renormalize:
        chosen = chosen / chosen.sum(axis=-1, keepdims=True)
    bad = ~xp.isfinite(top)                                           # [T, 1]
    return (xp.where(bad, np.int32(n_experts), experts).astype(np.int32, copy=False),
            xp.where(bad, np.float32(0.0), chosen))
