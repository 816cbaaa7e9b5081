"""The dense blocks of SPEC §1 in the order data flows: embedding, RMSNorm, RoPE, causal
attention, LM head. The MoE half of a layer lives in router.py, dispatcher.py, experts.py
and moe_layer.py; the layer loop in engine.py.

Tokens are *packed*: left padding is dropped once, at the edge (data.py), and every block
works on the real tokens of its sequences laid end to end, ``[T, ...]``, with per-sequence
start rows and lengths. Padding is thus never computed, never routed, and its hidden state is
zero by construction. With left padding, the causal mask of SPEC §1 restricted to a real
query is exactly "the real keys up to and including it", which is what the packed form does.

Notation: T packed tokens, b sequences, d model width, h heads (local under TP), Dh head
dim, V vocabulary. Arrays live on the backend (``bk.xp``) unless named ``*_host``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import F32, Backend


@dataclass
class Packed:
    """Real tokens of ``b`` sequences laid end to end.

    ``seqs``: global sequence indices [b]; ``lengths_host``: real tokens per sequence [b];
    ``starts_host``: first packed row of each sequence [b]; ``positions``: RoPE position of
    each row [T] (0 for a sequence's first real token; later chunks and decode steps
    continue the count); ``first_positions_host``: the position of each sequence's first
    new token [b].
    """

    seqs: np.ndarray
    lengths_host: np.ndarray
    starts_host: np.ndarray
    positions: object
    first_positions_host: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.lengths_host.sum())

    @property
    def n_seqs(self) -> int:
        return len(self.seqs)

    @property
    def last_rows_host(self) -> np.ndarray:
        """Packed row of each sequence's last token [b]."""
        return self.starts_host + self.lengths_host - 1


def pack(bk: Backend, seqs: np.ndarray, lengths_host: np.ndarray,
         first_position_host: np.ndarray | None = None) -> Packed:
    """Describe ``lengths_host[i]`` new tokens of sequence ``seqs[i]``, starting at position
    ``first_position_host[i]`` (0 for a whole prompt)."""
    lengths_host = np.asarray(lengths_host, dtype=np.int64)
    starts = np.zeros(len(lengths_host), dtype=np.int64)
    np.cumsum(lengths_host[:-1], out=starts[1:])
    first = (np.zeros_like(lengths_host) if first_position_host is None
             else np.asarray(first_position_host, dtype=np.int64))
    positions = (np.arange(int(lengths_host.sum()), dtype=np.int64)
                 - np.repeat(starts - first, lengths_host))
    return Packed(np.asarray(seqs, dtype=np.int64), lengths_host, starts,
                  bk.asarray(positions.astype(np.int32)), first)


def embed(bk: Backend, table, ids) -> object:
    """Token ids [T] -> rows of the embedding table [T, d] (storage dtype)."""
    return bk.take_rows(table, ids)


def rms_norm(bk: Backend, x, gain, eps: float):
    """``x / sqrt(mean(x^2) + eps) * g`` in float32, stored in dtype. x: [T, d]."""
    xp = bk.xp
    xf = x.astype(F32)
    inv = 1.0 / xp.sqrt(xp.mean(xf * xf, axis=-1, keepdims=True) + np.float32(eps))
    return bk.store(xf * inv * gain.astype(F32))


def rope_tables(bk: Backend, positions, head_dim: int, theta: float):
    """cos and sin of ``[ang, ang]`` for each position: two float32 [T, 1, Dh] arrays.
    Angles are formed in float64: at 10^4 positions float32 would lose ~1e-3 rad."""
    xp = bk.xp
    inv_freq = theta ** (-xp.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [Dh/2]
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]                 # [T, Dh/2]
    ang = xp.concatenate([ang, ang], axis=-1)[:, None, :]                           # [T, 1, Dh]
    return xp.cos(ang).astype(F32), xp.sin(ang).astype(F32)


def apply_rope(bk: Backend, u, cos, sin):
    """Rotate-half RoPE of u [T, h, Dh] (any float dtype) in float32, stored in dtype."""
    xp = bk.xp
    uf = u.astype(F32)
    half = uf.shape[-1] // 2
    rotated = xp.concatenate([-uf[..., half:], uf[..., :half]], axis=-1)
    return bk.store(uf * cos + rotated * sin)


def causal_attention(bk: Backend, q, q_starts_host, q_lengths_host, k, v, k_starts_host,
                     k_lengths_host, scale: float):
    """Causal attention of packed queries against packed (or cached) keys.

    q: [Tq, h, Dh]; k, v: [Tk, h, Dh] (storage dtype). Sequence i has ``q_lengths[i]``
    queries at rows ``q_starts[i]...`` and ``k_lengths[i]`` keys at rows ``k_starts[i]...``;
    its queries are the *last* ``q_lengths[i]`` of its keys' positions, so query r attends to
    keys ``0 .. k_len - q_len + r`` (prefill: q_len = k_len; a decode step: q_len = 1).
    Returns [Tq, h*Dh] in storage dtype. Scores, softmax and accumulation are float32.
    """
    if bk.kernels is not None:
        return bk.kernels.attention(q, q_starts_host, q_lengths_host, k, v, k_starts_host,
                                    k_lengths_host, scale)
    xp = bk.xp
    n_q, heads, head_dim = q.shape
    out = xp.empty((n_q, heads * head_dim), dtype=bk.dtype)
    for q0, nq, k0, nk in zip(q_starts_host, q_lengths_host, k_starts_host, k_lengths_host):
        q0, nq, k0, nk = int(q0), int(nq), int(k0), int(nk)
        if nq == 0:
            continue
        kf = k[k0:k0 + nk].astype(F32).transpose(1, 2, 0)           # [h, Dh, nk]
        vf = v[k0:k0 + nk].astype(F32).transpose(1, 0, 2)           # [h, nk, Dh]
        # Query blocks bound the float32 score tile to ~16 MiB.
        block = max(1, (1 << 22) // max(1, heads * nk))
        for r0 in range(0, nq, block):
            r1 = min(nq, r0 + block)
            qf = q[q0 + r0:q0 + r1].astype(F32).transpose(1, 0, 2)  # [h, r, Dh]
            scores = (qf @ kf) * np.float32(scale)                  # [h, r, nk]
            query_pos = nk - nq + xp.arange(r0, r1)[:, None]        # [r, 1]
            scores = xp.where(xp.arange(nk)[None, :] <= query_pos, scores, -np.inf)
            scores = xp.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            att = probs @ vf                                        # [h, r, Dh]
            out[q0 + r0:q0 + r1] = bk.store(att.transpose(1, 0, 2).reshape(r1 - r0, -1))
    return out


def lm_head(bk: Backend, x_last, final_norm, w_lm, eps: float):
    """Final RMSNorm and LM head of each sequence's last token: [b, d] -> float32 [b, V]."""
    return bk.matmul(rms_norm(bk, x_last, final_norm, eps), w_lm, out_dtype=F32)
