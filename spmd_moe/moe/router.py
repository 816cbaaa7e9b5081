"""Top-k softmax router (SPEC §1), in float32.

``p = softmax(b Wr)``; the k largest p win, ties going to the lower expert index; the
winners' weights are renormalised to sum to one (SPEC §1, Mixtral, Qwen3-MoE with
``norm_topk_prob``) or kept as they are (OLMoE; ``ModelConfig.router_renorm``). Top-k is
k passes of argmax (which returns the first maximum, hence the tie rule) rather than a
sort: k is small, and both backends agree on argmax's tie behaviour, not on sort
stability. With the fused kernels everything after the GEMM is one launch
(kernels/rowwise.cu: router_topk, the same rule).

Notation: T tokens, d width, E experts, k top-k.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import F32, Backend


def route(bk: Backend, b, w_router, top_k: int, renormalize: bool = True):
    """b: [T, d] (storage dtype), w_router: [d, E] ->
    ``experts`` int32 [T, k] (best first) and ``weights`` float32 [T, k]: the winners'
    probabilities, divided by their sum when ``renormalize``."""
    xp = bk.xp
    logits = bk.matmul(b, w_router, out_dtype=F32)                    # [T, E]
    if bk.kernels is not None and bk.kernels.fuses("router"):
        return bk.kernels.route(logits, top_k, renormalize)           # one launch
    probs = xp.exp(logits - logits.max(axis=-1, keepdims=True))
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
    if not renormalize:
        return experts, chosen
    return experts, chosen / chosen.sum(axis=-1, keepdims=True)
