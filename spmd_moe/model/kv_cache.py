"""The stage's KV cache: keys and values of this rank's sequences for its stage's layers.

Filled by a chunked prefill (chunk c of a sequence attends to the keys of its chunks < c,
which the same stage wrote before: chunks.py) and by every decode step, which continues
from it. Preallocated once for the longest prompt (plus the tokens to generate); nothing is
ever reallocated.

Layout: sequence i (local index) owns rows ``[i*capacity, (i+1)*capacity)`` of each layer's
``[n_seqs*capacity, hk, Dh]`` arrays, and its token at position p sits at row
``i*capacity + p``. Writes go to the positions of the new tokens (``Packed.first_positions
_host``), not to a running fill counter, so that two micro-batches in flight on a stage
(engine.py's overlap) may write chunks of the same sequence in their layer order.

Only the key/value heads are kept: under grouped-query attention (SPEC §8) hk is fewer
than the query heads, and so is the cache.

Notation: T new tokens, b sequences, hk key/value heads (local under TP), Dh head dim.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import Backend
from .blocks import Packed


class KVCache:
    """Preallocated keys and values of ``n_seqs`` sequences from ``first_seq`` on."""

    def __init__(self, bk: Backend, layers: range, first_seq: int, n_seqs: int, capacity: int,
                 heads: int, head_dim: int):
        # ``heads`` are the key/value heads this rank holds (fewer than the query heads
        # under grouped-query attention). costs.kv_cache_bytes charges exactly this.
        self.first_seq, self.n_seqs, self.capacity = first_seq, n_seqs, capacity
        shape = (n_seqs * capacity, heads, head_dim)
        self.keys = {l: bk.xp.zeros(shape, dtype=bk.dtype) for l in layers}
        self.values = {l: bk.xp.zeros(shape, dtype=bk.dtype) for l in layers}
        self.lengths_host = np.zeros(n_seqs, dtype=np.int64)  # positions filled per sequence
        self.bk = bk

    def slots(self, packed: Packed) -> np.ndarray:
        """First cache row of each of ``packed``'s sequences [b]."""
        return (packed.seqs - self.first_seq) * self.capacity

    def write(self, layer: int, packed: Packed, k, v) -> None:
        """Store k, v [T, hk, Dh] of ``packed``'s new tokens at their positions."""
        first = packed.first_positions_host
        assert (first + packed.lengths_host <= self.capacity).all(), "KV cache overflow"
        rows = np.repeat(self.slots(packed) + first - packed.starts_host, packed.lengths_host)
        rows = self.bk.asarray(rows + np.arange(packed.n_tokens))
        self.bk.put_rows(self.keys[layer], rows, k)
        self.bk.put_rows(self.values[layer], rows, v)

    def view(self, layer: int, packed: Packed):
        """What ``packed``'s queries attend to: ``(keys, values, k_starts_host,
        k_lengths_host)``, the layer's whole arrays with each sequence's first row and its
        keys up to and including the new tokens (``causal_attention``'s key arguments)."""
        return (self.keys[layer], self.values[layer], self.slots(packed),
                packed.first_positions_host + packed.lengths_host)

    def advance(self, packed: Packed) -> None:
        """Record that ``packed``'s tokens are in the cache (after the stage's last layer):
        the next decode step of a sequence writes at its filled length."""
        local = packed.seqs - self.first_seq
        self.lengths_host[local] = np.maximum(self.lengths_host[local],
                                              packed.first_positions_host + packed.lengths_host)
