"""Multi-head latent attention (DeepSeek-V3, SPEC §8) on packed tokens, as transformers'
DeepseekV3Attention computes it, with the cache holding the latent (kv_cache.LatentCache).

- Queries: ``q = q_b(RMSNorm(q_a a))`` (or ``wq a``), per head ``[q_nope | q_rope]``.
- Keys and values: ``wkv_a a = [latent | k_rope]``, the latent RMSNorm'd, ``k_rope`` one
  head shared by every query head; RoPE on ``q_rope`` and ``k_rope`` only. The cache holds
  ``[latent | k_rope]``: c + R numbers per token and layer.
- Prefill (and chunks) expand: ``wkv_b latent`` gives each head's ``[k_nope | v]``; keys
  ``[k_nope | k_rope]``; causal attention with values of their own width.
- A decode step (one new token per sequence) attends in the absorbed form, as DeepSeek's
  inference code and FlashMLA do: ``wkv_b``'s key part folded into the query
  (``q_lat = q_nope W_uk^T``), attention of ``[q_lat | q_rope]`` against the cached rows
  (one K/V head, values the latent), and ``wkv_b``'s value part applied after.

Both forms are the same function (they differ in rounding points only). Under TP a rank
holds its heads' columns of ``wq``/``wq_b``/``wkv_b`` and rows of ``wo``; the latent's
projections are whole on every rank and the latent cache replicated (as vLLM does).

Notation: T new tokens, Tk keys, h query heads (local under TP), N nope width, R rope
width, c latent width (kv_lora_rank), Dv value width, W = c + R.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import Backend
from ..core.config import ModelConfig
from .blocks import Packed, Rope, causal_attention, qk_norm_rope, rms_norm

# transformers builds the two low-rank RMSNorms with their default eps, not rms_norm_eps.
LOW_RANK_EPS = 1e-6


def project(bk: Backend, lw, model: ModelConfig, a, heads: int, rope: Rope):
    """a [T, d] (normed hidden) -> ``q_nope`` [T, h, N], rotated ``q_rope`` [T, h, R], the
    normed ``latent`` [T, c] and rotated ``k_rope`` [T, 1, R] (storage dtype)."""
    xp, n = bk.xp, a.shape[0]
    nope, width, latent_width = model.nope_dim, model.rope_width, model.kv_lora_rank
    if lw.wq_a is not None:
        low = rms_norm(bk, bk.matmul(a, lw.wq_a), lw.q_a_norm, LOW_RANK_EPS)  # [T, q_lora]
        q = bk.matmul(low, lw.wq_b)
    else:
        q = bk.matmul(a, lw.wq)
    q = q.reshape(n, heads, model.head_dim)                                     # [T, h, N+R]
    compressed = bk.matmul(a, lw.wkv_a)                                         # [T, c+R]
    latent = rms_norm(bk, xp.ascontiguousarray(compressed[:, :latent_width]), lw.kv_a_norm,
                      LOW_RANK_EPS)                                             # [T, c]
    k_rope = xp.ascontiguousarray(compressed[:, latent_width:]).reshape(n, 1, width)
    q_rope = xp.ascontiguousarray(q[:, :, nope:])                               # [T, h, R]
    q_rope, k_rope = qk_norm_rope(bk, "none", q_rope, k_rope, None, None, 0.0, 0, 0, None,
                                  rope)
    return q[:, :, :nope], q_rope, latent, k_rope


def expanded(bk: Backend, model: ModelConfig, q_nope, q_rope, q_starts_host, q_lengths_host,
             latent, k_rope, k_starts_host, k_lengths_host, wkv_b, scale: float):
    """Prefill: the keys' latents [Tk, c] and rope keys [Tk, 1, R] expanded by ``wkv_b``
    into each head's keys [Tk, h, N+R] and values [Tk, h, Dv], then causal attention of
    ``[q_nope | q_rope]`` ([T, h, N+R]) -> [T, h*Dv]."""
    xp = bk.xp
    n_keys, heads, nope = latent.shape[0], q_nope.shape[1], model.nope_dim
    kv = bk.matmul(latent, wkv_b).reshape(n_keys, heads, nope + model.v_dim)  # [Tk, h, N+Dv]
    keys = xp.concatenate([kv[:, :, :nope], xp.broadcast_to(
        k_rope, (n_keys, heads, model.rope_width))], axis=-1)                  # [Tk, h, N+R]
    values = xp.ascontiguousarray(kv[:, :, nope:])                             # [Tk, h, Dv]
    q = xp.concatenate([q_nope, q_rope], axis=-1)                              # [T, h, N+R]
    return causal_attention(bk, q, q_starts_host, q_lengths_host, keys, values, k_starts_host,
                            k_lengths_host, scale)


def absorbed(bk: Backend, model: ModelConfig, q_nope, q_rope, rows, k_starts_host,
             k_lengths_host, wkv_b, scale: float):
    """A decode step: one query per sequence ([b, h, N] and [b, h, R]) against the cached
    rows [n, W] (sequence i's keys at ``k_starts[i]...``), in the absorbed form ->
    [b, h*Dv]. The fused kernels run the attention over the latent in one launch
    (FusedKernels.mla_decode); the generic code as one K/V head of width W whose values
    are its first c columns."""
    xp = bk.xp
    n, heads, nope, latent_width = q_nope.shape[0], q_nope.shape[1], model.nope_dim, \
        model.kv_lora_rank
    w = wkv_b.reshape(latent_width, heads, nope + model.v_dim)                  # [c, h, N+Dv]
    w_uk = w[:, :, :nope].transpose(1, 2, 0)                                    # [h, N, c]
    q_latent = bk.matmul(q_nope.transpose(1, 0, 2), w_uk)                       # [h, b, c]
    query = xp.concatenate([q_latent.transpose(1, 0, 2), q_rope], axis=-1)      # [b, h, W]
    starts, lengths = np.arange(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    if bk.kernels is not None and bk.kernels.fuses("mla_decode"):
        latent_out = bk.kernels.mla_decode(xp.ascontiguousarray(query), rows, k_starts_host,
                                           k_lengths_host, latent_width, scale)   # [b, h*c]
    else:
        keys = rows.reshape(rows.shape[0], 1, rows.shape[1])                    # [n, 1, W]
        values = keys[:, :, :latent_width]                                      # a view
        if bk.kernels is not None:
            values = xp.ascontiguousarray(values)    # the fused attention reads whole rows
        latent_out = causal_attention(bk, query, starts, lengths, keys, values,
                                      k_starts_host, k_lengths_host, scale)     # [b, h*c]
    w_uv = w[:, :, nope:].transpose(1, 0, 2)                                    # [h, c, Dv]
    out = bk.matmul(latent_out.reshape(n, heads, latent_width).transpose(1, 0, 2), w_uv)
    return xp.ascontiguousarray(out.transpose(1, 0, 2)).reshape(n, heads * model.v_dim)


def attention(bk: Backend, lw, model: ModelConfig, a, packed: Packed, rope: Rope, cache,
              layer: int, heads: int, scale: float):
    """MLA of ``packed``'s new tokens: a [T, d] (normed hidden) -> [T, h*Dv] before the
    output projection. With a ``cache`` (kv_cache.LatentCache) the new rows are written
    first and the keys are the cached ones; a pass of one new token per sequence then
    attends in the absorbed form, any other expands."""
    q_nope, q_rope, latent, k_rope = project(bk, lw, model, a, heads, rope)
    if cache is None:
        return expanded(bk, model, q_nope, q_rope, packed.starts_host, packed.lengths_host,
                        latent, k_rope, packed.starts_host, packed.lengths_host, lw.wkv_b,
                        scale)
    cache.write(layer, packed, latent, k_rope)
    keys, _, starts, lengths = cache.view(layer, packed)
    rows = keys.reshape(keys.shape[0], keys.shape[2])                           # [n, W]
    if packed.n_tokens == packed.n_seqs:
        return absorbed(bk, model, q_nope, q_rope, rows, starts, lengths, lw.wkv_b, scale)
    keys = cache.gather(rows, starts, lengths)                                  # [Tk, W]
    k_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return expanded(bk, model, q_nope, q_rope, packed.starts_host, packed.lengths_host,
                    keys[:, :model.kv_lora_rank], keys[:, None, model.kv_lora_rank:],
                    k_starts, lengths, lw.wkv_b, scale)
