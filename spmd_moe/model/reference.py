"""The single-process reference forward pass of SPEC §1, in float64 with NumPy.

Written independently of the engine, straight from the SPEC text: padded [B, S] arrays with
the mask matrix M (the engine packs tokens instead), dense loops over experts, the exact erf
from ``math``. Every layout is tested against it. Weights are those of SPEC §1, drawn here
from the SPEC's own formula (names, shapes and scales written out below, not taken from
weights.py, so that a wrong shape or scale there cannot hide), rounded to the config's
dtype, then widened to float64. Arithmetic is float64; with ``store=True``
(default) every activation SPEC §1 says is stored between operations is rounded to the
config's dtype, as the engine stores it, so that a bf16 run and the reference route tokens
the same way (a near-tie flipped by rounding noise moves a whole token to another expert).

Notation: B batch, S sequence, d width, H heads, Dh head dim, E experts, V vocabulary.
"""
from __future__ import annotations

import math
import zlib

import ml_dtypes
import numpy as np

from ..core.config import ModelConfig

_erf = np.frompyfunc(math.erf, 1, 1)


def _storage(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)


def spec_tensor(model: ModelConfig, name: str) -> tuple[tuple[int, int], float]:
    """Shape and scale of tensor ``name``, as SPEC §1's table gives them."""
    d, f, e, v = model.d_model, model.d_ff, model.n_experts, model.vocab_size
    last = name.rsplit(".", 1)[-1]
    if name == "embed":
        return (v, d), 1.0
    if name == "lm_head":
        return (d, v), d ** -0.5
    if last in ("wq", "wk", "wv", "wo"):
        return (d, d), d ** -0.5
    if last == "router":
        return (d, e), d ** -0.5
    if last == "w1":
        return (d, f), d ** -0.5
    if last == "w2":
        return (f, d), f ** -0.5
    raise KeyError(name)


def spec_weight(model: ModelConfig, seed: int, name: str) -> np.ndarray:
    """SPEC §1: ``W(name) = (rng(name).standard_normal(shape, float32) * scale)
    .astype(dtype)`` with ``rng(name)`` seeded by ``[seed, crc32(name)]``; float64 here."""
    shape, scale = spec_tensor(model, name)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, zlib.crc32(name.encode())])))
    values = rng.standard_normal(shape, dtype=np.float32) * scale
    return values.astype(_storage(model.dtype)).astype(np.float64)


def _rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(u: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """u: [B, S, H, Dh], pos: [B, S]."""
    dh = u.shape[-1]
    inv_freq = theta ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)        # [Dh/2]
    ang = pos[..., None].astype(np.float64) * inv_freq                        # [B, S, Dh/2]
    ang = np.concatenate([ang, ang], axis=-1)[:, :, None, :]                  # [B, S, 1, Dh]
    rotated = np.concatenate([-u[..., dh // 2:], u[..., :dh // 2]], axis=-1)
    return u * np.cos(ang) + rotated * np.sin(ang)


def reference_forward(model: ModelConfig, ids: np.ndarray, mask: np.ndarray | None = None,
                      seed: int = 0, store: bool = True) -> dict[str, np.ndarray]:
    """``hidden`` [B, S, d], ``logits`` [B, V] (last position), ``expert_counts`` [L, E]."""
    dtype = _storage(model.dtype) if store else np.float64

    def st(a: np.ndarray) -> np.ndarray:
        """Round to the storage dtype (the value an activation has between operations)."""
        return a.astype(dtype).astype(np.float64)
    ids = np.asarray(ids)
    mask = np.ones(ids.shape, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    n_batch, seq = ids.shape
    d, heads, dh, k = model.d_model, model.n_heads, model.head_dim, model.top_k
    pos = np.cumsum(mask, axis=1) - 1                                         # [B, S]
    pos = np.where(mask, pos, 0)
    # M[b, i, j] = 0 if j <= i and mask[b, j], else -inf.
    allowed = np.tril(np.ones((seq, seq), dtype=bool))[None] & mask[:, None, :]
    bias = np.where(allowed, 0.0, -np.inf)[:, None]                          # [B, 1, S, S]
    embed = spec_weight(model, seed, "embed")
    x = embed[np.where(mask, ids, 0)] * mask[..., None]                       # [B, S, d]
    counts = np.zeros((model.n_layers, model.n_experts), dtype=np.int64)
    for layer in range(model.n_layers):
        w = {n: spec_weight(model, seed, f"layers.{layer}.{n}")
             for n in ("wq", "wk", "wv", "wo", "router")}
        a = st(_rms_norm(x, model.norm_eps))                                  # g1 = ones
        q = st(a @ w["wq"]).reshape(n_batch, seq, heads, dh)
        kk = st(a @ w["wk"]).reshape(n_batch, seq, heads, dh)
        v = st(a @ w["wv"]).reshape(n_batch, seq, heads, dh)
        q, kk = st(_rope(q, pos, model.rope_theta)), st(_rope(kk, pos, model.rope_theta))
        scores = np.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(dh) + bias   # [B, H, S, S]
        with np.errstate(invalid="ignore"):
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
        probs = np.where(mask[:, None, :, None], probs, 0.0)                  # padding rows
        att = st(np.einsum("bhij,bjhd->bihd", probs, v).reshape(n_batch, seq, d))
        h = st(x + st(att @ w["wo"]))
        b = st(_rms_norm(h, model.norm_eps))                                  # g2 = ones
        logits = b @ w["router"]                                              # [B, S, E]
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        # Top-k, ties to the lower index: sort by (-p, index).
        top = np.argsort(-p, axis=-1, kind="stable")[..., :k]                 # [B, S, k]
        top_p = np.take_along_axis(p, top, axis=-1)
        gate = top_p / top_p.sum(axis=-1, keepdims=True)
        moe = np.zeros_like(x)
        for expert in range(model.n_experts):
            hit = (top == expert) & mask[..., None]                           # [B, S, k]
            rows = hit.any(axis=-1)
            counts[layer, expert] = int(rows.sum())
            if not rows.any():
                continue
            prefix = f"layers.{layer}.experts.{expert}"
            w1 = spec_weight(model, seed, f"{prefix}.w1")
            w2 = spec_weight(model, seed, f"{prefix}.w2")
            u = b[rows] @ w1
            y = st(st(0.5 * u * (1.0 + _erf(u / math.sqrt(2.0)).astype(np.float64))) @ w2)
            moe[rows] += (gate * hit).sum(axis=-1)[rows, None] * y
        x = st(h + moe)
        x = x * mask[..., None]
    final = _rms_norm(x[:, -1], model.norm_eps)                               # gf = ones
    lm = spec_weight(model, seed, "lm_head")
    return {"hidden": x, "logits": final @ lm, "expert_counts": counts}


def reference_generate(model: ModelConfig, ids: np.ndarray, mask: np.ndarray | None,
                       new_tokens: int, seed: int = 0, eos_id: int | None = None) -> np.ndarray:
    """Greedy tokens [B, N] by running the full forward on the growing sequence at every
    step (no KV cache): the check for decode. -1 after a sequence emitted ``eos_id``."""
    ids = np.asarray(ids)
    mask = np.ones(ids.shape, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    out = np.full((ids.shape[0], new_tokens), -1, dtype=np.int64)
    live = np.ones(ids.shape[0], dtype=bool)
    for step in range(new_tokens):
        logits = reference_forward(model, ids, mask, seed)["logits"]
        chosen = np.argmax(logits, axis=-1)
        out[live, step] = chosen[live]
        ids = np.concatenate([ids, chosen[:, None]], axis=1)
        mask = np.concatenate([mask, live[:, None]], axis=1)
        if eos_id is not None:
            live &= chosen != eos_id
    return out
