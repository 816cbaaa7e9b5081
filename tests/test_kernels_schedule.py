"""Host-side planning of the fused kernels (backend/kernels/schedule.py) against NumPy, no
GPU: tile lists, tile heights, split-K, variants, alignment, chunking, vector widths, which
tile and heads a CTA runs, with a float64 emulation of the kernels' tiled online softmax
over the schedule."""
from __future__ import annotations

import re

import numpy as np
import pytest
from fakes.emulations import run_schedule
from kernel_cases import random_sequences, reference_attention

from spmd_moe.backend.kernels import schedule as sch
from spmd_moe.backend.kernels.compile import KERNEL_DIR


def test_attention_variant_choice():
    assert sch.attention_variant(8, "bfloat16").kernel == "flash_attention_bf16_m64_d16_v16"
    assert sch.attention_variant(6, "bfloat16").kernel == "flash_attention_bf16_m64_d16_v4"
    assert sch.attention_variant(40, "bfloat16").kernel == "flash_attention_bf16_m64_d64_v16"
    assert sch.attention_variant(128, "bfloat16").kernel == "flash_attention_bf16_m64_d128_v16"
    assert sch.attention_variant(32, "float32").kernel == "flash_attention_f32_d32"
    long = sch.attention_variant(128, "bfloat16", 128)
    assert (long.kernel, long.block_m, long.threads) == ("flash_attention_bf16_m128_d128_v16",
                                                         128, 256)
    # float32 has 64-row tiles only.
    assert sch.attention_variant(64, "float32", 128).block_m == 64
    for bad in (0, 7, 130, 256):
        with pytest.raises(ValueError, match="head dim"):
            sch.attention_variant(bad, "bfloat16")
    with pytest.raises(ValueError, match="float16"):
        sch.attention_variant(64, "float16")
    with pytest.raises(ValueError, match="64 or 128"):
        sch.attention_variant(64, "bfloat16", 32)
    # Shared memory fits an sm_80 (163 KiB) and an H100 (227 KiB) block.
    for head_dim in (16, 32, 64, 128):
        for dtype in ("bfloat16", "float32"):
            for block_m in sch.TILE_ROWS:
                assert sch.attention_variant(head_dim, dtype, block_m).shared_bytes <= 163 * 1024


def test_16_byte_copies_need_16_byte_aligned_bases():
    """cp.async of 16 bytes faults on an address that is not 16-byte aligned: one base
    pointer off the boundary takes the 4-byte copies (and 64-row tiles)."""
    aligned = (1 << 20, 2 << 20, 3 << 20)
    for block_m in sch.TILE_ROWS:
        assert sch.attention_variant(64, "bfloat16", block_m, aligned).kernel.endswith("_v16")
    for skewed in ((8, 0, 0), (0, 4, 0), (0, 0, 1028)):
        pointers = tuple(a + b for a, b in zip(aligned, skewed))
        for block_m in sch.TILE_ROWS:
            variant = sch.attention_variant(64, "bfloat16", block_m, pointers)
            assert variant.kernel == "flash_attention_bf16_m64_d64_v4"
            assert variant.block_m == 64 and variant.threads == 128


def test_tile_rows_take_128_queries_for_long_bf16_prefill():
    paper = np.full(8, 10000)
    assert sch.tile_rows(paper, heads=32, n_sm=132, dtype_name="bfloat16") == 128
    assert sch.tile_rows(paper, heads=32, n_sm=132, dtype_name="float32") == 64
    assert sch.tile_rows(np.ones(8), heads=32, n_sm=132, dtype_name="bfloat16") == 64  # decode
    assert sch.tile_rows(np.full(8, 300), heads=32, n_sm=132, dtype_name="bfloat16") == 64
    # Long but too few CTAs to fill the device without splitting: 64 rows.
    assert sch.tile_rows(np.array([1024]), heads=2, n_sm=132, dtype_name="bfloat16") == 64
    assert sch.tile_rows(np.zeros(0), heads=2, n_sm=132, dtype_name="bfloat16") == 64


@pytest.mark.parametrize("case", range(16))
def test_schedule_emulation_matches_reference(case):
    rng = np.random.default_rng(case)
    decode = case % 3 == 0
    kv_heads, head_dim = int(rng.integers(1, 4)), int(rng.choice([8, 16, 32]))
    heads = kv_heads * (1, 2, 4, 8)[case % 4]
    lengths = random_sequences(rng, int(rng.integers(1, 6)), int(rng.choice([5, 70, 400])),
                               decode=decode, gap=int(rng.integers(0, 3)))
    # Few SMs: long tiles stay whole; many SMs: the schedule splits them (split-K).
    n_sm = int(rng.choice([1, 1000]))
    block_m = sch.TILE_ROWS[case % 2]
    schedule = sch.attention_schedule(*lengths, heads=heads, n_sm=n_sm, block_m=block_m)
    n_q = int(lengths[1].sum())
    n_k = int((lengths[2] + lengths[3]).max()) + 2
    q = rng.standard_normal((n_q, heads, head_dim))
    k = rng.standard_normal((n_k, kv_heads, head_dim))
    v = rng.standard_normal((n_k, kv_heads, head_dim))
    scale = head_dim ** -0.5
    got = run_schedule(schedule, q, k, v, scale)
    want = reference_attention(q, *lengths[:2], k, v, *lengths[2:], scale)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def tiles_by_field(schedule):
    names = ("q_row0", "n_rows", "k_row0", "diag", "kb_begin", "kb_end", "slot")
    return {n: schedule.tiles[:, i].astype(np.int64) for i, n in enumerate(names)}


@pytest.mark.parametrize("block_m", sch.TILE_ROWS)
def test_schedule_covers_each_query_once_and_skips_masked_blocks(block_m):
    rng = np.random.default_rng(7)
    q_starts, q_lengths, k_starts, k_lengths = random_sequences(rng, 9, 300)
    for n_sm in (1, 1000):
        schedule = sch.attention_schedule(q_starts, q_lengths, k_starts, k_lengths, heads=2,
                                          n_sm=n_sm, block_m=block_m)
        assert schedule.block_m == block_m
        t = tiles_by_field(schedule)
        assert (t["n_rows"] >= 1).all() and (t["n_rows"] <= block_m).all()
        # Whole tiles write rows directly; split tiles through exactly one combine group.
        written = np.zeros(int(q_lengths.sum()), np.int64)
        for q0, n, slot in zip(t["q_row0"], t["n_rows"], t["slot"]):
            if slot < 0:
                written[q0:q0 + n] += 1
        for q0, n, slot0, splits in schedule.combine:
            written[q0:q0 + n] += 1
            pieces = np.flatnonzero((t["slot"] >= slot0) & (t["slot"] < slot0 + splits))
            assert len(pieces) == splits
            ranges = sorted(zip(t["kb_begin"][pieces], t["kb_end"][pieces]))
            assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert (written == 1).all()
        # The last visited block holds a visible key; no block past the causal bound.
        key_end = t["diag"] + t["n_rows"]
        last_whole = t["slot"] < 0
        assert ((t["kb_end"][last_whole] - 1) * sch.BLOCK_N < key_end[last_whole]).all()
        assert (t["kb_end"] * sch.BLOCK_N < key_end + sch.BLOCK_N).all()
        assert set(np.unique(t["slot"][t["slot"] >= 0])) == set(range(schedule.n_slots))


def test_schedule_orders_tiles_by_sequence_longest_first():
    q_lengths = np.array([200, 130, 64])
    starts = np.concatenate([[0], np.cumsum(q_lengths)[:-1]])
    schedule = sch.attention_schedule(starts, q_lengths, starts, q_lengths, heads=32, n_sm=1)
    t = tiles_by_field(schedule)
    seq_of_tile = np.searchsorted(starts, t["q_row0"], side="right") - 1
    assert (np.diff(seq_of_tile) >= 0).all()
    work = t["kb_end"] - t["kb_begin"]
    for s in range(3):
        assert (np.diff(work[seq_of_tile == s]) <= 0).all()


def test_split_k_only_when_the_device_would_idle():
    # Paper prefill: 8 x 10000 tokens, 32 heads -> 1256 tiles x 32 heads: never split.
    lengths = np.full(8, 10000)
    starts = np.arange(8) * 10000
    prefill = sch.attention_schedule(starts, lengths, starts, lengths, heads=32, n_sm=132)
    assert prefill.n_slots == 0 and len(prefill.combine) == 0
    assert prefill.n_tiles == 8 * -(-10000 // sch.BLOCK_M)
    long = sch.attention_schedule(starts, lengths, starts, lengths, heads=32, n_sm=132,
                                  block_m=128)
    assert long.n_slots == 0 and long.n_tiles == 8 * -(-10000 // 128)
    # Decode of 8 sequences against 10000 cached keys: 256 CTAs on 132 SMs -> split.
    ones = np.ones(8, np.int64)
    decode = sch.attention_schedule(np.arange(8), ones, starts, lengths, heads=32, n_sm=132)
    assert decode.n_slots > 0 and len(decode.combine) == 8
    assert decode.n_tiles * 32 >= sch.SPLIT_TARGET_PER_SM * 132
    # A short cache is not worth splitting.
    short = sch.attention_schedule(np.arange(8), ones, starts, np.full(8, 100), heads=32,
                                   n_sm=132)
    assert short.n_slots == 0


def test_schedule_of_nothing():
    empty = np.zeros(0, np.int64)
    schedule = sch.attention_schedule(empty, empty, empty, empty, heads=4, n_sm=132)
    assert schedule.n_tiles == 0 and schedule.tiles.shape == (0, sch.TILE_FIELDS)
    zero_q = sch.attention_schedule([0], [0], [0], [5], heads=4, n_sm=132)
    assert zero_q.n_tiles == 0


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (5, 5), (8, 4), (8, 2), (8, 1), (12, 3)])
def test_cta_work_puts_a_group_s_query_heads_side_by_side(heads, kv_heads):
    n_tiles, group = 7, heads // kv_heads
    tile, head, kv_head = sch.cta_work(np.arange(n_tiles * heads), n_tiles, heads, kv_heads)
    pairs = sorted(zip(tile.tolist(), head.tolist()))
    assert pairs == [(t, h) for t in range(n_tiles) for h in range(heads)]
    assert (kv_head == head // group).all()
    # Blocks g*i .. g*i + g-1 are one tile of one K/V head, its g query heads in order.
    for first in range(0, n_tiles * heads, group):
        span = slice(first, first + group)
        assert len(set(tile[span])) == len(set(kv_head[span])) == 1
        assert head[span].tolist() == list(range(head[first], head[first] + group))
    if group == 1:                                   # multi-head: head * n_tiles + tile
        blocks = np.arange(n_tiles * heads)
        assert (tile == blocks % n_tiles).all() and (head == blocks // n_tiles).all()


def test_cta_work_mirrors_the_kernel_source():
    """The Python mirror and CtaWork in flash_attention.cu compute the same thing: the
    kernel's formula, evaluated here as written (unsigned division)."""
    text = (KERNEL_DIR / "flash_attention.cu").read_text()
    body = re.search(r"struct CtaWork \{.*?\n\};", text, re.DOTALL).group(0)
    for line in ("const unsigned group = unsigned(heads) / unsigned(kv_heads);",
                 "const unsigned pair = unsigned(block) / group;",
                 "tile = pair % unsigned(n_tiles);", "kv_head = pair / unsigned(n_tiles);",
                 "head = kv_head * group + unsigned(block) % group;"):
        assert line in body, line
    # Both kernels (bf16 and float32) take their tile and heads from it.
    assert text.count("const CtaWork work(blockIdx.x, n_tiles, heads, kv_heads);") == 2


def test_schedule_rejects_more_queries_than_keys():
    with pytest.raises(AssertionError, match="as many keys as queries"):
        sch.attention_schedule([0], [5], [0], [4], heads=1, n_sm=1)


def test_ffn_row_chunk_bounds_the_hidden():
    # Everything fits: one pass.
    assert sch.ffn_row_chunk(1000, 40, 2, 512 << 20) == 1000
    # Paper: 160000 rows x F 16384 bf16 is 5 GB; 512 MiB gives 16384-row passes.
    rows = sch.ffn_row_chunk(160000, 16384, 2, 512 << 20)
    assert rows == 16384 and rows * 16384 * 2 <= 512 << 20
    for n_rows, d_ff, itemsize, budget in [(10**6, 1000, 4, 10**8), (5000, 3, 2, 1000)]:
        rows = sch.ffn_row_chunk(n_rows, d_ff, itemsize, budget)
        assert rows % 128 == 0 and rows >= 128
        assert rows * d_ff * itemsize <= max(budget, 128 * d_ff * itemsize)


def test_row_vector_bytes_and_block():
    assert sch.row_vector_bytes(4096 * 2, 256, 512) == 16
    assert sch.row_vector_bytes(4096 * 2, 256, 516) == 4
    assert sch.row_vector_bytes(10 * 2, 256, 256) == 4
    assert sch.row_vector_bytes(11 * 2, 256, 256) == 2
    assert sch.row_block(512) == (128, 1)
    assert sch.row_block(4) == (4, 32)
    assert sch.row_block(5) == (8, 16)
    assert sch.row_block(1) == (1, 128)
    assert sch.row_grid(10**6, 1, 132) == 32 * 132
    assert sch.row_grid(3, 32, 132) == 1
