"""The stage's KV cache (kv_cache.py): chunks land at their positions, whatever order the
micro-batches write them in, and a query sees its sequence's keys up to itself."""
import numpy as np
import pytest

from spmd_moe.backend.array import Backend, choose_backend
from spmd_moe.core.costs import kv_cache_bytes
from spmd_moe.model.blocks import pack
from spmd_moe.model.kv_cache import KVCache


def backend():
    return Backend(choose_backend("numpy"), "float32")


def keys_of(seq, positions, heads=2, dim=4):
    """Distinct values naming (sequence, position): [n, h, Dh]."""
    positions = np.asarray(positions)
    return (seq * 1000 + positions[:, None, None] * 10
            + np.arange(heads)[None, :, None] + np.zeros((1, 1, dim))).astype(np.float32)


def test_chunks_written_out_of_order_land_at_their_positions():
    bk = backend()
    cache = KVCache(bk, range(1, 3), first_seq=3, n_seqs=2, capacity=6, heads=2, head_dim=4)
    # Micro-batch 1 (positions 2-4 of sequence 3, 0-1 of 4) written before micro-batch 0
    # (positions 0-1 of sequence 3): as two passes in flight may do at different layers.
    later = pack(bk, np.array([3, 4]), np.array([3, 2]), np.array([2, 0]))
    earlier = pack(bk, np.array([3]), np.array([2]), np.array([0]))
    for packed, parts in ((later, [(3, [2, 3, 4]), (4, [0, 1])]), (earlier, [(3, [0, 1])])):
        k = np.concatenate([keys_of(s, p) for s, p in parts])
        cache.write(2, packed, k, -k)
    keys, values, starts, lengths = cache.view(2, later)
    assert starts.tolist() == [0, 6] and lengths.tolist() == [5, 2]
    assert np.array_equal(keys[0:5], keys_of(3, range(5)))
    assert np.array_equal(values[6:8], -keys_of(4, range(2)))
    assert not keys[5].any() and not keys[8:].any()             # nothing else written
    assert not cache.keys[1].any()                              # other layers untouched


def test_advance_keeps_the_furthest_position_and_overflow_asserts():
    bk = backend()
    cache = KVCache(bk, range(1), first_seq=0, n_seqs=2, capacity=4, heads=2, head_dim=4)
    second = pack(bk, np.array([0]), np.array([2]), np.array([2]))
    first = pack(bk, np.array([0, 1]), np.array([2, 3]))
    cache.advance(second)
    cache.advance(first)
    assert cache.lengths_host.tolist() == [4, 3]
    too_far = pack(bk, np.array([1]), np.array([2]), np.array([3]))
    with pytest.raises(AssertionError, match="KV cache overflow"):
        cache.write(0, too_far, keys_of(1, [3, 4]), keys_of(1, [3, 4]))
    assert kv_cache_bytes(1, 2, 4, 2, 4, 4) == sum(a.nbytes for a in
                                                   (*cache.keys.values(), *cache.values.values()))
