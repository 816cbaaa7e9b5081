"""What the kernel tests share: float64 references, random packed sequences, NaN-poisoned
outputs, tolerances (the ``device`` fixture is conftest.py's)."""
from __future__ import annotations

import numpy as np

from spmd_moe.backend.array import BF16, F32


def host(arr) -> np.ndarray:
    """A device array copied to the host (synchronised), a host array as it is."""
    return arr.get() if hasattr(arr, "get") else np.asarray(arr)


def relative_error(got, want) -> float:
    got, want = host(got).astype(np.float64), host(want).astype(np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def random_sequences(rng, n_seqs, max_len, decode=False, gap=0):
    """Packed q rows and (possibly cache-laid-out) k rows: host int64 arrays [b]."""
    k_lengths = rng.integers(1, max_len + 1, n_seqs)
    q_lengths = np.ones(n_seqs, np.int64) if decode else np.minimum(
        k_lengths, rng.integers(1, max_len + 1, n_seqs))
    if not decode and rng.random() < 0.5:
        q_lengths = k_lengths.copy()                     # a plain prefill
    q_starts = np.concatenate([[0], np.cumsum(q_lengths)[:-1]])
    k_slot = k_lengths + gap                             # cache rows with unused tails
    k_starts = np.concatenate([[0], np.cumsum(k_slot)[:-1]])
    return q_starts, q_lengths, k_starts, k_lengths


def reference_attention(q, q_starts, q_lengths, k, v, k_starts, k_lengths, scale):
    """Float64 causal attention, the semantics of model.causal_attention: q [Tq, h, D],
    k [Tk, hk, D], v [Tk, hk, Dv], query head j reading K/V head j // (h/hk).
    -> [Tq, h*Dv]."""
    n_q, heads, head_dim = q.shape
    kv_of_head = np.arange(heads) // (heads // k.shape[1])                  # [h]
    out = np.zeros((n_q, heads, v.shape[2]))
    for q0, nq, k0, nk in zip(q_starts, q_lengths, k_starts, k_lengths):
        if nq == 0:
            continue
        qs = q[q0:q0 + nq].astype(np.float64)                           # [nq, h, D]
        ks = k[k0:k0 + nk][:, kv_of_head].astype(np.float64)            # [nk, h, D]
        vs = v[k0:k0 + nk][:, kv_of_head].astype(np.float64)
        scores = np.einsum("qhd,khd->hqk", qs, ks) * scale               # [h, nq, nk]
        visible = np.arange(nk)[None, :] <= (nk - nq + np.arange(nq))[:, None]
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[q0:q0 + nq] = np.einsum("hqk,khd->qhd", p, vs)
    return out.reshape(n_q, heads * v.shape[2])


def poisoned(xp, shape, dtype):
    """An array of NaN on the device (made on the host: CuPy's fill may lack a bf16 loop),
    so that any element a kernel leaves unwritten fails the comparison."""
    return xp.asarray(np.full(shape, np.nan, dtype=dtype))


def reference_ffn(x, w1, w2):
    from spmd_moe.backend.array import erfc_numpy

    h = x.astype(np.float64) @ w1.astype(np.float64)
    return (0.5 * h * erfc_numpy(-h / np.sqrt(2))) @ w2.astype(np.float64)


def dtype_id(value):
    """Readable test ids for dtype parameters."""
    return {BF16: "bf16", F32: "f32"}.get(value) if isinstance(value, np.dtype) else None


def tolerance(dtype) -> float:
    """Relative Frobenius error allowed: bf16 storage (8-bit mantissa) or float32."""
    return 1e-2 if dtype == BF16 else 1e-5
