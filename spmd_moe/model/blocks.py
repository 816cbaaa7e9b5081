"""The dense blocks of SPEC §1 in the order data flows: embedding, RMSNorm, projections
(with the families' biases), q/k norms (the checkpoint families' difference, SPEC §8),
RoPE (rotate-half or interleaved pairs, default or YaRN frequencies), causal attention
with grouped key/value heads and a value width of its own, LM head. Multi-head latent
attention builds on these in mla.py. The MoE half of a layer lives in router.py,
dispatcher.py, experts.py and layer.py of moe/; the layer loop in engine/engine.py.

Tokens are *packed*: left padding is dropped once, at the edge (inputs.py), and every block
works on the real tokens of its sequences laid end to end, ``[T, ...]``, with per-sequence
start rows and lengths. Padding is thus never computed, never routed, and its hidden state is
zero by construction. With left padding, the causal mask of SPEC §1 restricted to a real
query is exactly "the real keys up to and including it", which is what the packed form does.

Notation: T packed tokens, b sequences, d model width, h query heads and hk key/value heads
(local under TP; h = hk in SPEC §1), g = h/hk, Dh query/key head dim, Dv value head dim, R
rotated width, V vocabulary. Arrays live on the backend (``bk.xp``) unless named
``*_host``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backend.array import F32, Backend
from ..core.config import ModelConfig


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


def linear(bk: Backend, x, w, bias=None, out_dtype=None):
    """``x W (+ b)``: x [T, k] -> [T, n] in the storage dtype (or ``out_dtype``); the bias
    (float32 [n]) is added to the float32 accumulator before the one rounding."""
    if bias is None:
        return bk.matmul(x, w, out_dtype=out_dtype)
    if bk.kernels is not None:
        return bk.kernels.bias_add(bk.matmul(x, w, out_dtype=F32), bias,
                                   bk.dtype if out_dtype is None else out_dtype)
    y = bk.matmul(x, w, out_dtype=F32)
    y += bias
    return y if out_dtype is not None and np.dtype(out_dtype) == F32 else bk.store(y)


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


@dataclass(frozen=True)
class RopeSpec:
    """A model's rotation: ``inv_freq`` float64 [R/2] (host), cos and sin times ``scale``
    (YaRN's attention factor), and ``interleaved`` pairs (2j, 2j+1) instead of halves
    (j, j + R/2). Built once per engine (:func:`rope_spec`)."""

    inv_freq: np.ndarray
    scale: float = 1.0
    interleaved: bool = False

    @property
    def width(self) -> int:
        return 2 * len(self.inv_freq)


def rope_frequencies(model: ModelConfig) -> np.ndarray:
    """``theta^(-2j/R)`` for j < R/2 (float64; R the rotated width), or YaRN's blend of
    them and them over ``factor`` (transformers' ``_compute_yarn_parameters``: the
    low-frequency dims interpolated, the high ones kept, a linear ramp between the dims
    that make ``beta_slow`` and ``beta_fast`` rotations over ``original_max`` positions)."""
    width, theta = model.rope_width, model.rope_theta
    inv_freq = theta ** (-np.arange(0, width, 2, dtype=np.float64) / width)       # [R/2]
    yarn = model.yarn
    if yarn is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return (width * math.log(yarn.original_max / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, width - 1)
    if low == high:
        high += 0.001                                     # transformers' guard
    ramp = np.clip((np.arange(width // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    kept = 1 - ramp                                       # 1: extrapolated (unscaled)
    return inv_freq / yarn.factor * (1 - kept) + inv_freq * kept


def rope_spec(model: ModelConfig) -> RopeSpec:
    return RopeSpec(rope_frequencies(model), model.yarn.attention_factor if model.yarn
                    else 1.0, model.rope_interleave)


def softmax_scale(model: ModelConfig) -> float:
    """``1/sqrt(Dh)``, times DeepSeek's YaRN ``mscale_all_dim`` factor squared."""
    mscale = model.yarn.softmax_mscale if model.yarn is not None else 1.0
    return float(model.head_dim) ** -0.5 * mscale * mscale


class Rope:
    """The rotation of one pass's tokens: ``positions`` int32 [T] (device) and the model's
    :class:`RopeSpec`. The fused kernel computes its angles from these (``inv_freq`` on the
    device: the engine's copy, uploaded once, or this pass's); the generic code takes the
    cos/sin :meth:`tables`, built once per pass on first use."""

    def __init__(self, bk: Backend, positions, spec: RopeSpec, inv_freq=None):
        self.bk, self.positions, self.spec = bk, positions, spec
        self._tables = None
        self._inv_freq = inv_freq

    @property
    def inv_freq(self):
        """float64 [R/2] on the backend."""
        if self._inv_freq is None:
            self._inv_freq = self.bk.asarray(self.spec.inv_freq)
        return self._inv_freq

    def tables(self):
        if self._tables is None:
            self._tables = rope_tables(self.bk, self.positions, self.spec)
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
                                    summed, rope.positions, rope.inv_freq, rope.spec.scale,
                                    rope.spec.interleaved)
    q, k = qk_norm(bk, kind, q, k, q_gain, k_gain, eps, q_width, kv_width, summed)
    cos, sin = rope.tables()
    interleaved = rope.spec.interleaved
    return apply_rope(bk, q, cos, sin, interleaved), apply_rope(bk, k, cos, sin, interleaved)


def rope_tables(bk: Backend, positions, spec: RopeSpec):
    """cos and sin (times ``spec.scale``) of each position's angles: two float32 arrays,
    [T, 1, R] of ``[ang, ang]`` (rotate-half) or [T, 1, R/2] (interleaved pairs). Angles
    are formed in float64: at 10^4 positions float32 would lose ~1e-3 rad."""
    xp = bk.xp
    inv_freq = xp.asarray(spec.inv_freq)                                             # [R/2]
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]                 # [T, R/2]
    if not spec.interleaved:
        ang = xp.concatenate([ang, ang], axis=-1)                                   # [T, R]
    ang = ang[:, None, :]
    return ((xp.cos(ang) * spec.scale).astype(F32), (xp.sin(ang) * spec.scale).astype(F32))


def apply_rope(bk: Backend, u, cos, sin, interleaved: bool = False):
    """RoPE of u [T, h, R] (any float dtype) in float32, stored in dtype: rotate-half
    (columns j and j + R/2 rotate together), or interleaved pairs (2j, 2j + 1), each pair
    written back in place: a fixed permutation of transformers' de-interleaved output,
    applied alike to queries and keys, so their dot products are its own."""
    xp = bk.xp
    uf = u.astype(F32)
    if interleaved:
        even, odd = uf[..., 0::2], uf[..., 1::2]                           # [T, h, R/2]
        out = xp.empty_like(uf)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = odd * cos + even * sin
        return bk.store(out)
    half = uf.shape[-1] // 2
    rotated = xp.concatenate([-uf[..., half:], uf[..., :half]], axis=-1)
    return bk.store(uf * cos + rotated * sin)


def causal_attention(bk: Backend, q, q_starts_host, q_lengths_host, k, v, k_starts_host,
                     k_lengths_host, scale: float):
    """Causal attention of packed queries against packed (or cached) keys.

    q: [Tq, h, Dh]; k: [Tk, hk, Dh], v: [Tk, hk, Dv] (storage dtype), hk dividing h: query
    head j uses key/value head ``j // (h/hk)`` (grouped-query attention; hk = h in SPEC §1;
    MLA's absorbed decode: hk = 1, keys the cached latent and rope key, values the latent).
    Sequence i has ``q_lengths[i]``
    queries at rows ``q_starts[i]...`` and ``k_lengths[i]`` keys at rows ``k_starts[i]...``;
    its queries are the *last* ``q_lengths[i]`` of its keys' positions, so query r attends to
    keys ``0 .. k_len - q_len + r`` (prefill: q_len = k_len; a decode step: q_len = 1).
    Returns [Tq, h*Dv] in storage dtype. Scores, softmax and accumulation are float32.
    """
    if bk.kernels is not None and bk.kernels.fits_attention(q.shape[2], v.shape[2]):
        return bk.kernels.attention(q, q_starts_host, q_lengths_host, k, v, k_starts_host,
                                    k_lengths_host, scale)
    xp = bk.xp
    n_q, heads, head_dim = q.shape
    kv_heads, v_dim = k.shape[1], v.shape[2]
    group = heads // kv_heads
    assert group * kv_heads == heads and v.shape[:2] == k.shape[:2], (q.shape, k.shape, v.shape)
    out = xp.empty((n_q, heads * v_dim), dtype=bk.dtype)
    for q0, nq, k0, nk in zip(q_starts_host, q_lengths_host, k_starts_host, k_lengths_host):
        q0, nq, k0, nk = int(q0), int(nq), int(k0), int(nk)
        if nq == 0:
            continue
        # A group's g query heads share one K/V head: their rows are stacked against it
        # ([hk, g*r, Dh] @ [hk, Dh, nk]), so K/V are neither copied g times nor broadcast
        # (NumPy's matmul leaves BLAS for broadcast operands).
        kf = k[k0:k0 + nk].astype(F32).transpose(1, 2, 0)                # [hk, Dh, nk]
        vf = v[k0:k0 + nk].astype(F32).transpose(1, 0, 2)                # [hk, nk, Dv]
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
            att = (probs @ vf).reshape(heads, r1 - r0, v_dim)               # [h, r, Dv]
            out[q0 + r0:q0 + r1] = bk.store(att.transpose(1, 0, 2).reshape(r1 - r0, -1))
    return out


def lm_head(bk: Backend, x_last, final_norm, w_lm, eps: float):
    """Final RMSNorm and LM head of each sequence's last token: [b, d] -> float32 [b, V]."""
    return bk.matmul(rms_norm(bk, x_last, final_norm, eps), w_lm, out_dtype=F32)
