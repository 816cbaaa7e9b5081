"""The stage's KV caches: what this rank's sequences' earlier tokens leave for the later
ones, per layer of its stage. :class:`KVCache` holds keys and values (multi-head and
grouped-query attention); :class:`LatentCache` holds multi-head latent attention's latent
and rope key (mla.py). The family chooses (engine.Engine.new_cache); both have the same
interface (``slots``, ``write``, ``view``, ``advance``) and are sized by a rule of
core/costs.py (``kv_cache_bytes``, ``latent_cache_bytes``).

Filled by a chunked prefill (chunk c of a sequence attends to the keys of its chunks < c,
which the same stage wrote before: chunks.py) and by every decode step, which continues
from it. Preallocated once for the longest prompt (plus the tokens to generate); nothing is
ever reallocated.

Layout: sequence i (local index) owns rows ``[i*capacity, (i+1)*capacity)`` of each layer's
arrays, and its token at position p sits at row ``i*capacity + p``. Writes go to the
positions of the new tokens (``Packed.first_positions_host``), not to a running fill
counter, so that two micro-batches in flight on a stage (engine.py's overlap) may write
chunks of the same sequence in their layer order.

Notation: T new tokens, b sequences, hk key/value heads (local under TP), Dh head dim, c
latent width, R rope width, W = c + R.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import Backend
from .blocks import Packed


class _Cache:
    """Rows of ``n_seqs`` sequences from ``first_seq`` on, ``capacity`` positions each."""

    def __init__(self, bk: Backend, first_seq: int, n_seqs: int, capacity: int):
        self.bk, self.first_seq, self.n_seqs, self.capacity = bk, first_seq, n_seqs, capacity
        self.lengths_host = np.zeros(n_seqs, dtype=np.int64)  # positions filled per sequence

    def slots(self, packed: Packed) -> np.ndarray:
        """First cache row of each of ``packed``'s sequences [b]."""
        return (packed.seqs - self.first_seq) * self.capacity

    def _rows(self, packed: Packed):
        """The cache row of each of ``packed``'s new tokens, on the backend [T]."""
        first = packed.first_positions_host
        assert (first + packed.lengths_host <= self.capacity).all(), "KV cache overflow"
        rows = np.repeat(self.slots(packed) + first - packed.starts_host, packed.lengths_host)
        return self.bk.asarray(rows + np.arange(packed.n_tokens))

    def _visible(self, packed: Packed) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's first row and its keys up to and including the new tokens."""
        return self.slots(packed), packed.first_positions_host + packed.lengths_host

    def advance(self, packed: Packed) -> None:
        """Record that ``packed``'s tokens are in the cache (after the stage's last layer):
        the next decode step of a sequence writes at its filled length."""
        local = packed.seqs - self.first_seq
        self.lengths_host[local] = np.maximum(self.lengths_host[local],
                                              packed.first_positions_host + packed.lengths_host)

    def gather(self, rows, starts_host: np.ndarray, lengths_host: np.ndarray):
        """``rows[starts[i] : starts[i] + lengths[i]]`` of each sequence, end to end
        ([sum(lengths), ...]): a sequence's cached keys as packed rows."""
        index = np.repeat(starts_host - np.concatenate([[0], np.cumsum(lengths_host)[:-1]]),
                          lengths_host) + np.arange(int(lengths_host.sum()))
        return self.bk.take_rows(rows, self.bk.asarray(index.astype(np.int64)))


class KVCache(_Cache):
    """Keys and values, ``[n_seqs*capacity, hk, Dh]`` per layer: only the key/value heads
    are kept (under grouped-query attention, SPEC §8, fewer than the query heads)."""

    def __init__(self, bk: Backend, layers: range, first_seq: int, n_seqs: int, capacity: int,
                 heads: int, head_dim: int):
        # ``heads`` are the key/value heads this rank holds (fewer than the query heads
        # under grouped-query attention). costs.kv_cache_bytes charges exactly this.
        super().__init__(bk, first_seq, n_seqs, capacity)
        shape = (n_seqs * capacity, heads, head_dim)
        self.keys = {l: bk.xp.zeros(shape, dtype=bk.dtype) for l in layers}
        self.values = {l: bk.xp.zeros(shape, dtype=bk.dtype) for l in layers}

    def arrays(self) -> list:
        return [*self.keys.values(), *self.values.values()]

    def write(self, layer: int, packed: Packed, k, v) -> None:
        """Store k, v [T, hk, Dh] of ``packed``'s new tokens at their positions."""
        rows = self._rows(packed)
        self.bk.put_rows(self.keys[layer], rows, k)
        self.bk.put_rows(self.values[layer], rows, v)

    def view(self, layer: int, packed: Packed):
        """What ``packed``'s queries attend to: ``(keys, values, k_starts_host,
        k_lengths_host)``, the layer's whole arrays with each sequence's first row and its
        keys up to and including the new tokens (``causal_attention``'s key arguments)."""
        return (self.keys[layer], self.values[layer], *self._visible(packed))


class LatentCache(_Cache):
    """MLA's cache: ``[n_seqs*capacity, W]`` rows per layer, each token's normalised
    latent (c) then its rotated rope key (R): W = c + R numbers per token and layer
    (DeepSeek-V3: 512 + 64 = 576, against 2 x 128 heads x 128 expanded). Viewed as
    attention's keys it is one K/V head of width W whose values are its first c columns
    (the absorbed form, mla.absorbed). costs.latent_cache_bytes charges exactly this."""

    def __init__(self, bk: Backend, layers: range, first_seq: int, n_seqs: int, capacity: int,
                 latent_width: int, rope_width: int):
        super().__init__(bk, first_seq, n_seqs, capacity)
        self.latent_width = latent_width
        shape = (n_seqs * capacity, latent_width + rope_width)
        self.rows = {l: bk.xp.zeros(shape, dtype=bk.dtype) for l in layers}

    def arrays(self) -> list:
        return list(self.rows.values())

    def write(self, layer: int, packed: Packed, latent, k_rope) -> None:
        """Store the latent [T, c] and rope key [T, 1, R] of ``packed``'s new tokens."""
        rope = k_rope.reshape(k_rope.shape[0], k_rope.shape[2])                  # [T, R]
        row = self.bk.xp.concatenate([latent, rope], axis=1)                      # [T, W]
        self.bk.put_rows(self.rows[layer], self._rows(packed), row)

    def view(self, layer: int, packed: Packed):
        """``(keys [n, 1, W], values [n, 1, c], k_starts_host, k_lengths_host)``: the
        layer's rows as one K/V head, its values the latent columns (a view), as
        :meth:`KVCache.view`."""
        rows = self.rows[layer]
        keys = rows.reshape(rows.shape[0], 1, rows.shape[1])
        return (keys, keys[:, :, :self.latent_width], *self._visible(packed))
