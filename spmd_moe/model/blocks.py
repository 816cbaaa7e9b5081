"""The dense blocks of SPEC §1 in the order data flows: embedding, RMSNorm, q/k norms (the
checkpoint families' difference, SPEC §8), RoPE, causal attention with grouped key/value
heads, LM head. The MoE half of a layer lives in router.py, dispatcher.py, experts.py
and layer.py of moe/; the layer loop in engine/engine.py.

Tokens are *packed*: left padding is dropped once, at the edge (inputs.py), and every block
works on the real tokens of its sequences laid end to end, ``[T, ...]``, with per-sequence
start rows and lengths. Padding is thus never computed, never routed, and its hidden state is
zero by construction. With left padding, the causal mask of SPEC §1 restricted to a real
query is exactly "the real keys up to and including it", which is what the packed form does.

Notation: T packed tokens, b sequences, d model width, h query heads and hk key/value heads
(local under TP; h = hk in SPEC §1), g = h/hk, Dh head dim, V vocabulary. Arrays live on the backend (``bk.xp``) unless named ``*_host``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend.array import F32, Backend


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
    """``x / sqrt(mean(x^2) + eps) * g`` in float32, stored in dtype. x: [T, d] (or
    [..., d]: over the last axis). One launch with the fused kernels."""
    if bk.kernels is not None and gain.dtype == x.dtype:
        return bk.kernels.rms_norm(x, gain, eps)
    xp = bk.xp
    xf = x.astype(F32)
    inv = 1.0 / xp.sqrt(xp.mean(xf * xf, axis=-1, keepdims=True) + np.float32(eps))
    return bk.store(xf * inv * gain.astype(F32))


def add_rms_norm(bk: Backend, x, y, gain, eps: float):
    """The residual add feeding a norm: x, y [T, d] (storage dtype) -> ``(h, rms_norm(h))``
    with ``h = x + y`` added in float32 and stored in dtype. One launch with the fused
    kernels (rowwise.cu: add_rms_norm)."""
    if bk.kernels is not None and gain.dtype == x.dtype == y.dtype:
        return bk.kernels.add_rms_norm(x, y, gain, eps)
    h = bk.store(x.astype(F32) + y.astype(F32))
    return h, rms_norm(bk, h, gain, eps)


def residual_add(bk: Backend, h, moe):
    """The MoE residual: h [T, d] (storage dtype) + moe float32 [T, d], added in float32,
    stored in dtype. One launch with the fused kernels (rowwise.cu: residual_add)."""
    if bk.kernels is not None:
        return bk.kernels.residual_add(h, moe)
    return bk.store(h.astype(F32) + moe)


def square_sum(bk: Backend, x):
    """x [T, w] -> float32 [T, 1]: each row's sum of squares over these columns."""
    xf = x.astype(F32)
    return bk.xp.ascontiguousarray((xf * xf).sum(axis=-1, keepdims=True))


def rms_norm_summed(bk: Backend, x, gain, eps: float, width: int, sums):
    """RMSNorm of this rank's columns x [T, w] of rows ``width`` wide, given the whole
    rows' sums of squares ``sums`` (float32 [T, 1], added over the ranks holding them)."""
    inv = 1.0 / bk.xp.sqrt(sums / np.float32(width) + np.float32(eps))
    return bk.store(x.astype(F32) * inv * gain.astype(F32))


def _flat(u):
    """[T, h, Dh] -> [T, h*Dh] (also for T = 0: an empty micro-batch of a chunk schedule)."""
    return u.reshape(u.shape[0], u.shape[1] * u.shape[2])


def qk_square_sums(bk: Backend, q, k):
    """q [T, h, Dh], k [T, hk, Dh] -> float32 [T, 2]: each row's sum of squares over this
    rank's columns of the q and of the k projection; what a ``full`` :func:`qk_norm` needs,
    summed over the ranks that split the heads (TP), in one allreduce."""
    return bk.xp.ascontiguousarray(bk.xp.concatenate(
        [square_sum(bk, _flat(q)), square_sum(bk, _flat(k))], axis=1))


def qk_norm(bk: Backend, kind: str, q, k, q_gain, k_gain, eps: float, q_width: int,
            kv_width: int, summed=None):
    """The q/k normalisation of a family (ModelConfig.qk_norm), before RoPE.

    q: [T, h, Dh], k: [T, hk, Dh] (storage dtype) -> the same shapes.
    ``none``: unchanged (SPEC §1, Mixtral). ``head`` (Qwen3-MoE): RMSNorm over each head's
    Dh, gains [Dh]. ``full`` (OLMoE): RMSNorm over the whole projection, H*Dh for q and
    H_kv*Dh for k, gains of this rank's columns; under TP a rank holds some heads only and
    ``summed`` is :func:`qk_square_sums` summed over the group (None: this rank holds every
    head). ``q_width``/``kv_width`` are the widths that sum covers (a K/V head replicated on
    r ranks counts r times: r * H_kv*Dh).
    """
    if kind == "none":
        return q, k
    if kind == "head":
        return rms_norm(bk, q, q_gain, eps), rms_norm(bk, k, k_gain, eps)
    if summed is None:
        qn = rms_norm(bk, _flat(q), q_gain, eps)                                  # [T, h*Dh]
        kn = rms_norm(bk, _flat(k), k_gain, eps)                                  # [T, hk*Dh]
    else:
        qn = rms_norm_summed(bk, _flat(q), q_gain, eps, q_width, summed[:, :1])
        kn = rms_norm_summed(bk, _flat(k), k_gain, eps, kv_width, summed[:, 1:])
    return qn.reshape(q.shape), kn.reshape(k.shape)


class Rope:
    """The rotation of one pass's tokens: ``positions`` int32 [T] (device) and ``theta``.
    The fused kernel computes its angles from these; the generic code takes the cos/sin
    :meth:`tables`, built once per pass on first use."""

    def __init__(self, bk: Backend, positions, head_dim: int, theta: float):
        self.bk, self.positions, self.head_dim, self.theta = bk, positions, head_dim, theta
        self._tables = None

    def tables(self):
        if self._tables is None:
            self._tables = rope_tables(self.bk, self.positions, self.head_dim, self.theta)
        return self._tables


def qk_norm_rope(bk: Backend, kind: str, q, k, q_gain, k_gain, eps: float, q_width: int,
                 kv_width: int, summed, rope: Rope):
    """:func:`qk_norm` then :func:`apply_rope` on q and k (same arguments; the rotation of
    ``rope``) -> (q, k). With the fused kernels one launch for both, q and k rewritten in
    place (rowwise.cu: qk_norm_rope; the norm's result rounded to the storage dtype before
    the rotation, as here)."""
    kernels = bk.kernels
    if kernels is not None and kernels.fuses("qk_rope") and (
            kind == "none" or q_gain.dtype == k_gain.dtype == q.dtype):
        return kernels.qk_norm_rope(kind, q, k, q_gain, k_gain, eps, q_width, kv_width,
                                    summed, rope.positions, rope.theta)
    q, k = qk_norm(bk, kind, q, k, q_gain, k_gain, eps, q_width, kv_width, summed)
    cos, sin = rope.tables()
    return apply_rope(bk, q, cos, sin), apply_rope(bk, k, cos, sin)


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

    q: [Tq, h, Dh]; k, v: [Tk, hk, Dh] (storage dtype), hk dividing h: query head j uses
    key/value head ``j // (h/hk)`` (grouped-query attention; hk = h in SPEC §1).
    Sequence i has ``q_lengths[i]``
    queries at rows ``q_starts[i]...`` and ``k_lengths[i]`` keys at rows ``k_starts[i]...``;
    its queries are the *last* ``q_lengths[i]`` of its keys' positions, so query r attends to
    keys ``0 .. k_len - q_len + r`` (prefill: q_len = k_len; a decode step: q_len = 1).
    Returns [Tq, h*Dh] in storage dtype. Scores, softmax and accumulation are float32.
    """
    if bk.kernels is not None and bk.kernels.fused_attention:
        return bk.kernels.attention(q, q_starts_host, q_lengths_host, k, v, k_starts_host,
                                    k_lengths_host, scale)
    xp = bk.xp
    n_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    assert group * kv_heads == heads, (q.shape, k.shape)
    out = xp.empty((n_q, heads * head_dim), dtype=bk.dtype)
    for q0, nq, k0, nk in zip(q_starts_host, q_lengths_host, k_starts_host, k_lengths_host):
        q0, nq, k0, nk = int(q0), int(nq), int(k0), int(nk)
        if nq == 0:
            continue
        # A group's g query heads share one K/V head: their rows are stacked against it
        # ([hk, g*r, Dh] @ [hk, Dh, nk]), so K/V are neither copied g times nor broadcast
        # (NumPy's matmul leaves BLAS for broadcast operands).
        kf = k[k0:k0 + nk].astype(F32).transpose(1, 2, 0)                # [hk, Dh, nk]
        vf = v[k0:k0 + nk].astype(F32).transpose(1, 0, 2)                # [hk, nk, Dh]
        # Query blocks bound the float32 score tile to ~16 MiB.
        block = max(1, (1 << 22) // max(1, heads * nk))
        for r0 in range(0, nq, block):
            r1 = min(nq, r0 + block)
            qf = q[q0 + r0:q0 + r1].astype(F32).transpose(1, 0, 2)          # [h, r, Dh]
            qf = qf.reshape(kv_heads, group * (r1 - r0), head_dim)          # [hk, g*r, Dh]
            scores = (qf @ kf) * np.float32(scale)                          # [hk, g*r, nk]
            query_pos = nk - nq + xp.tile(xp.arange(r0, r1), group)[:, None]   # [g*r, 1]
            scores = xp.where(xp.arange(nk)[None, :] <= query_pos, scores, -np.inf)
            scores = xp.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            att = (probs @ vf).reshape(heads, r1 - r0, head_dim)            # [h, r, Dh]
            out[q0 + r0:q0 + r1] = bk.store(att.transpose(1, 0, 2).reshape(r1 - r0, -1))
    return out


def lm_head(bk: Backend, x_last, final_norm, w_lm, eps: float):
    """Final RMSNorm and LM head of each sequence's last token: [b, d] -> float32 [b, V]."""
    return bk.matmul(rms_norm(bk, x_last, final_norm, eps), w_lm, out_dtype=F32)
