"""Routers, in float32: the top-k softmax router (SPEC §1) and DeepSeek-V3's grouped
sigmoid router (SPEC §8).

``p = softmax(b Wr)``; the k largest p win, ties going to the lower expert index; the
winners' weights are renormalised to sum to one (SPEC §1, Mixtral, Qwen3-MoE with
``norm_topk_prob``) or kept as they are (OLMoE; ``ModelConfig.router_renorm``). Top-k is
k passes of argmax (which returns the first maximum, hence the tie rule) rather than a
sort: k is small, and both backends agree on argmax's tie behaviour, not on sort
stability. With the fused kernels everything after the GEMM is one launch
(kernels/rowwise.cu: router_topk, the same rule).

DeepSeek-V3 (:func:`route_sigmoid`): ``s = sigmoid(b Wr)``; selection on ``s + bias``
(``e_score_correction_bias``), restricted to the ``topk_group`` best of ``n_group`` groups
of experts (a group's score: the sum of its two best biased scores); weights from the
unbiased ``s``, divided by their sum (plus 1e-20, as transformers) when renormalised,
times ``routed_scaling_factor``. Groups and experts are picked by the same argmax rounds.


A token whose logits have no finite maximum (a NaN, +inf, or every one -inf) has no
softmax: on both paths it is routed to the sentinel expert ``E`` with weight 0, which the
dispatcher counts (its last bin) and refuses with the layer named (dispatcher.py), before
any row moves; nothing is gathered from outside the rows.

Notation: T tokens, d width, E experts, k top-k, G groups.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import F32, Backend
from .experts import sigmoid


def route_for(bk: Backend, b, lw, model):
    """The model's router (``ModelConfig.router_score``) on b [T, d] with the layer's
    weights -> (``experts`` int32 [T, k], ``weights`` float32 [T, k])."""
    if model.router_score == "sigmoid":
        return route_sigmoid(bk, b, lw.router, lw.router_bias, model.top_k, model.n_group,
                             model.topk_group, model.router_renorm, model.routed_scale)
    experts, weights = route(bk, b, lw.router, model.top_k, model.router_renorm)
    if model.routed_scale != 1:
        weights = weights * np.float32(model.routed_scale)
    return experts, weights


def _top(xp, values, count: int):
    """Indices [T, count] of each row's ``count`` largest values, best first, ties to the
    lower index (argmax rounds on a copy)."""
    rows = xp.arange(values.shape[0])
    remaining = values.copy()
    chosen = xp.empty((values.shape[0], count), dtype=np.int32)
    for j in range(count):
        best = xp.argmax(remaining, axis=-1)                          # [T]
        chosen[:, j] = best
        remaining[rows, best] = -np.inf
    return chosen


def route_sigmoid(bk: Backend, b, w_router, bias, top_k: int, n_group: int, topk_group: int,
                  renormalize: bool, scale: float):
    """DeepSeek-V3's router: b [T, d] (storage dtype), w_router [d, E], bias float32 [E]
    or None -> ``experts`` int32 [T, k] (best first by biased score) and ``weights``
    float32 [T, k] (their unbiased sigmoid scores, renormalised and scaled)."""
    xp = bk.xp
    logits = bk.matmul(b, w_router, out_dtype=F32)                    # [T, E]
    scores = sigmoid(bk, logits)
    choice = scores if bias is None else scores + bias
    n_tokens, n_experts = choice.shape
    if n_group > 1 and n_tokens:
        per_group = choice.reshape(n_tokens, n_group, n_experts // n_group)
        best_two = xp.sort(per_group, axis=-1)[:, :, -2:]
        group_scores = best_two[:, :, 1] + best_two[:, :, 0]           # [T, G]
        kept = xp.zeros((n_tokens, n_group), dtype=bool)
        kept[xp.arange(n_tokens)[:, None], _top(xp, group_scores, topk_group)] = True
        choice = xp.where(xp.repeat(kept, n_experts // n_group, axis=1), choice, -np.inf)
    experts = _top(xp, choice, top_k)                                  # [T, k]
    weights = xp.take_along_axis(scores, experts.astype(np.int64), axis=1)
    if renormalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    bad = ~xp.isfinite(logits.max(axis=-1, keepdims=True))           # [T, 1]: the sentinel
    return (xp.where(bad, np.int32(n_experts), experts).astype(np.int32, copy=False),
            xp.where(bad, np.float32(0.0), weights * np.float32(scale)).astype(F32))


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
