"""Flash attention (flash_attention.cu and fused.FusedKernels.attention): the launch code on
the fake device (its schedule kept per pass, the shared-memory opt-in, base alignment, tile
heights) and, on the fake device and on a GPU where usable, the kernels against float64:
random shapes and lengths, prefill and decode, split-K, grouped-query heads at groups of
1, 2, 4 and 8, outputs poisoned with NaN so that an unwritten element fails."""
from __future__ import annotations

import numpy as np
import pytest
from fakes.cupy import FakeCupy
from fakes.emulations import address
from fakes.kernels import FakeModule, make_fake_fused
from kernel_cases import (dtype_id, poisoned, random_sequences, reference_attention,
                          relative_error, tolerance)

from spmd_moe.backend.array import BF16, F32
from spmd_moe.backend.kernels import schedule as sch
from spmd_moe.backend.kernels.fused import FusedKernels


def test_fused_kernels_refuse_old_devices(fake_gpu):
    with pytest.raises(RuntimeError, match="sm_80"):
        FusedKernels(FakeCupy(), "75", n_sm=40, shared_limit=64 << 10, load=FakeModule)


def test_attention_schedule_is_kept_for_a_pass_and_rebuilt_for_new_lengths(fake_gpu):
    fused, fake = make_fake_fused(), FakeCupy()
    rng = np.random.default_rng(0)
    q = fake.asarray(rng.standard_normal((10, 2, 16)).astype(BF16))
    k = fake.asarray(rng.standard_normal((20, 2, 16)).astype(BF16))
    fused.attention(q, [0], [10], k, k, [0], [10], 0.25)
    first = fused._schedule
    fused.attention(q, [0], [10], k, k, [0], [10], 0.25)          # the next layer
    assert fused._schedule is first
    second = fused.attention(q, [0], [10], k, k, [0], [20], 0.25)  # the next decode step
    assert fused._schedule is not first
    want = reference_attention(q.get(), [0], [10], k.get(), k.get(), [0],
                               [20], 0.25)
    assert relative_error(second, want) < 1e-2
    kernel = fused.attention_module.kernels["flash_attention_bf16_m64_d16_v16"]
    assert kernel.launches == 3 and kernel.max_dynamic_shared_size_bytes == 48 << 10


def test_large_shared_memory_is_opted_in(fake_gpu):
    fused, fake = make_fake_fused(), FakeCupy()
    q = fake.asarray(np.ones((3, 1, 128), BF16))
    fused.attention(q, [0], [3], q, q, [0], [3], 0.1)
    kernel = fused.attention_module.kernels["flash_attention_bf16_m64_d128_v16"]
    assert kernel.max_dynamic_shared_size_bytes == sch.attention_variant(
        128, "bfloat16").shared_bytes > 48 << 10
    fused.attention(q, [0], [3], q, q, [0], [3], 0.1, tile_rows=128)
    kernel = fused.attention_module.kernels["flash_attention_bf16_m128_d128_v16"]
    assert kernel.max_dynamic_shared_size_bytes == sch.attention_variant(
        128, "bfloat16", 128).shared_bytes


def launched(fused) -> dict[str, int]:
    """Launches per attention kernel (not the split-K merges)."""
    return {name: kernel.launches for name, kernel in fused.attention_module.kernels.items()
            if kernel.launches and name.startswith("flash_attention_")}


def offset_view(fake, values, offset_bytes: int):
    """``values`` copied into a device array whose base address is ``offset_bytes`` past a
    64-byte boundary (a view into a larger allocation, C-contiguous)."""
    flat = fake.zeros(values.size + 64, values.dtype)
    start = (-address(flat) % 64 + offset_bytes) // values.dtype.itemsize
    view = flat[start:start + values.size].reshape(values.shape)
    view[...] = fake.asarray(values)
    assert address(view) % 64 == offset_bytes
    return view


@pytest.mark.parametrize("offset,kernel", [(0, "flash_attention_bf16_m64_d32_v16"),
                                           (8, "flash_attention_bf16_m64_d32_v4"),
                                           (2, "flash_attention_bf16_m64_d32_v16")])
def test_attention_checks_base_alignment(fake_gpu, offset, kernel):
    """k starting 8 bytes off a 16-byte boundary takes the 4-byte copies; 2 bytes off (an
    odd bf16 element) is copied to an aligned array first. The fake kernels fail on a
    misaligned cp.async source, as the hardware would."""
    fused, fake = make_fake_fused(), FakeCupy()
    rng = np.random.default_rng(offset)
    q = fake.asarray(rng.standard_normal((70, 2, 32)).astype(BF16))
    k_values = rng.standard_normal((90, 2, 32)).astype(BF16)
    k = offset_view(fake, k_values, offset)
    got = fused.attention(q, [0], [70], k, k, [0], [90], 0.2)
    assert launched(fused) == {kernel: 1}
    want = reference_attention(q.get(), [0], [70], k_values, k_values, [0], [90], 0.2)
    assert relative_error(got, want) < 1e-2


def test_attention_tile_height_by_length_and_by_request(fake_gpu, monkeypatch):
    fused, fake = make_fake_fused(), FakeCupy()
    fused.n_sm = 1                 # so that one long sequence fills the "device"
    rng = np.random.default_rng(5)
    q = fake.asarray(rng.standard_normal((1100, 2, 16)).astype(BF16))
    fused.attention(q, [0], [1100], q, q, [0], [1100], 0.25)                  # long prefill
    fused.attention(q[:1], [0], [1], q, q, [0], [1100], 0.25)                 # a decode step
    fused.attention(q, [0], [1100], q, q, [0], [1100], 0.25, tile_rows=64)   # forced
    assert launched(fused) == {"flash_attention_bf16_m128_d16_v16": 1,
                               "flash_attention_bf16_m64_d16_v16": 2}
    monkeypatch.setenv("SPMD_MOE_ATTENTION_TILE", "128")
    forced = make_fake_fused()
    forced.attention(q[:1], [0], [1], q, q, [0], [1100], 0.25)
    assert launched(forced) == {"flash_attention_bf16_m128_d16_v16": 1}
    assert "128-query tiles (SPMD_MOE_ATTENTION_TILE)" in forced.describe()
    monkeypatch.setenv("SPMD_MOE_ATTENTION_TILE", "96")
    with pytest.raises(ValueError, match="SPMD_MOE_ATTENTION_TILE='96' is not auto, 64 or 128"):
        make_fake_fused()


ATTENTION_CASES = [(head_dim, head_dim, dtype, mode, 64) for head_dim in (8, 16, 32, 64, 128)
                   for dtype in (BF16, F32) for mode in ("prefill", "decode")]
# 4-byte row copies (6), and head dims padded to the next instantiation (40, 96).
ATTENTION_CASES += [(6, 6, BF16, "prefill", 64), (40, 40, BF16, "decode", 64),
                    (96, 96, BF16, "prefill", 64)]
# 128-query tiles (8 warps), every instantiated head dim, prefill and decode.
ATTENTION_CASES += [(head_dim, head_dim, BF16, mode, 128)
                    for head_dim in (8, 16, 32, 40, 64, 128) for mode in ("prefill", "decode")]
# MLA's prefill: values narrower than queries and keys (the tiny fixtures' 12 and 6, in the
# kernels of head dim 16; DeepSeek-V3's 192 and 128, in their own), both tile heights.
ATTENTION_CASES += [(12, 6, dtype, mode, 64) for dtype in (BF16, F32)
                    for mode in ("prefill", "decode")]
ATTENTION_CASES += [(192, 128, dtype, mode, tiles) for dtype, tiles in
                    ((BF16, 64), (BF16, 128), (F32, 64)) for mode in ("prefill", "decode")]


@pytest.mark.parametrize("head_dim,v_dim,dtype,mode,tile_rows", ATTENTION_CASES, ids=dtype_id)
def test_flash_attention_matches_float64(device, head_dim, v_dim, dtype, mode, tile_rows):
    xp, fused = device
    rng = np.random.default_rng(head_dim * 7 + len(mode) + (v_dim != head_dim) * v_dim)
    heads = int(rng.integers(1, 5))
    lengths = random_sequences(rng, int(rng.integers(1, 7)), int(rng.choice([37, 300, 1500])),
                               decode=mode == "decode", gap=int(rng.integers(0, 5)))
    attend_against_float64(xp, fused, rng, lengths, heads, heads, head_dim, dtype, tile_rows,
                           v_dim)
    assert fused.fits_attention(head_dim, v_dim) and not fused.fits_attention(192, 130)


def attend_against_float64(xp, fused, rng, lengths, heads, kv_heads, head_dim, dtype,
                           tile_rows, v_dim=None):
    """Random q, k, v (values ``v_dim`` wide, default the head dim) for ``lengths`` through
    the fused attention into a NaN-poisoned output, every row written and within the
    dtype's tolerance of float64: (got, q, k, v, scale)."""
    v_dim = v_dim or head_dim
    n_q, n_k = int(lengths[1].sum()), int((lengths[2] + lengths[3]).max())
    q = rng.standard_normal((n_q, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((n_k, kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((n_k, kv_heads, v_dim)).astype(dtype)
    scale = head_dim ** -0.5
    out = poisoned(xp, (n_q, heads * v_dim), dtype)
    fused.attention(xp.asarray(q), *lengths[:2], xp.asarray(k), xp.asarray(v), *lengths[2:],
                    scale, out=out, tile_rows=tile_rows)
    got = out.get().astype(np.float64)
    assert np.isfinite(got).all(), "rows left unwritten"
    want = reference_attention(q, *lengths[:2], k, v, *lengths[2:], scale)
    assert relative_error(got, want) < tolerance(dtype)
    return got, q, k, v, scale


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 2)])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
def test_flash_attention_split_k_decode(device, dtype, heads, kv_heads):
    """Few sequences against long caches: the schedule splits, the combine merges (also
    with 4 query heads per cached K/V head)."""
    xp, fused = device
    rng = np.random.default_rng(3)
    k_lengths = np.array([5000, 1, 3000, 64])
    q_lengths = np.ones(4, np.int64)
    k_starts = np.array([0, 5000, 6000, 9000])
    schedule = sch.attention_schedule(np.arange(4), q_lengths, k_starts, k_lengths,
                                      heads=heads, n_sm=fused.n_sm)
    assert schedule.n_slots > 0
    q = rng.standard_normal((4, heads, 64)).astype(dtype)
    k = rng.standard_normal((9064, kv_heads, 64)).astype(dtype)
    v = rng.standard_normal((9064, kv_heads, 64)).astype(dtype)
    out = poisoned(xp, (4, heads * 64), dtype)
    fused.attention(xp.asarray(q), np.arange(4), q_lengths, xp.asarray(k), xp.asarray(v),
                    k_starts, k_lengths, 0.125, out=out)
    want = reference_attention(q, np.arange(4), q_lengths, k, v, k_starts, k_lengths, 0.125)
    assert relative_error(out.get(), want) < tolerance(dtype)


# Grouped-query attention: 1, 2, 4 and 8 query heads per K/V head, head dims 64 and 128
# (the published families') and 6 (4-byte copies, padded to 16), prefill against packed
# keys and decode against a KV cache holding only the K/V heads (rows with unused tails),
# odd lengths, both tile heights (bf16) and float32.
GQA_CASES = [(group, head_dim, dtype, mode, tile_rows)
             for group in (1, 2, 4, 8) for head_dim in (64, 128)
             for dtype, tile_rows in ((BF16, 64), (BF16, 128), (F32, 64))
             for mode in ("prefill", "decode")]
GQA_CASES += [(group, 6, BF16, mode, 64) for group in (2, 8) for mode in ("prefill", "decode")]


@pytest.mark.parametrize("group,head_dim,dtype,mode,tile_rows", GQA_CASES, ids=dtype_id)
def test_grouped_query_attention_matches_float64(device, group, head_dim, dtype, mode,
                                                 tile_rows):
    xp, fused = device
    rng = np.random.default_rng(group * 1000 + head_dim + len(mode) + tile_rows)
    kv_heads = int(rng.integers(1, 3))
    heads = kv_heads * group
    lengths = random_sequences(rng, int(rng.integers(2, 6)), int(rng.choice([37, 131, 301])),
                               decode=mode == "decode", gap=int(rng.integers(1, 6)))
    got, q, k, v, scale = attend_against_float64(xp, fused, rng, lengths, heads, kv_heads,
                                                 head_dim, dtype, tile_rows)
    if group > 1:
        # Each query head reads its own group's K/V head: attending to another one (or to
        # K/V head 0 for all) would be far off.
        wrong = reference_attention(q, *lengths[:2], np.roll(k, 1, axis=1),
                                    np.roll(v, 1, axis=1), *lengths[2:], scale)
        assert kv_heads == 1 or relative_error(got, wrong) > 0.1


def test_attention_refuses_k_v_heads_that_do_not_divide_the_query_heads(fake_gpu):
    fused, fake = make_fake_fused(), FakeCupy()
    q = fake.asarray(np.ones((3, 6, 16), BF16))
    k = fake.asarray(np.ones((3, 4, 16), BF16))
    with pytest.raises(AssertionError):
        fused.attention(q, [0], [3], k, k, [0], [3], 0.25)


@pytest.mark.parametrize("dtype,tile_rows", [(BF16, 64), (F32, 64), (BF16, 128)], ids=dtype_id)
@pytest.mark.parametrize("head_dim", [16, 128])
def test_flash_attention_split_k_prefill(device, dtype, head_dim, tile_rows, monkeypatch):
    """Splits of 64- and 128-query tiles (partials from every warp, rows with no visible
    key in a split, warps skipping whole blocks), forced by pretending the device has many
    SMs."""
    xp, fused = device
    monkeypatch.setattr(fused, "n_sm", 100000)
    rng = np.random.default_rng(head_dim)
    lengths = (np.array([0, 900]), np.array([900, 700]), np.array([0, 900]),
               np.array([900, 1000]))
    assert sch.attention_schedule(*lengths, heads=2, n_sm=100000,
                                  block_m=tile_rows).n_slots > 0
    q = rng.standard_normal((1600, 2, head_dim)).astype(dtype)
    k = rng.standard_normal((1900, 2, head_dim)).astype(dtype)
    v = rng.standard_normal((1900, 2, head_dim)).astype(dtype)
    out = poisoned(xp, (1600, 2 * head_dim), dtype)
    fused.attention(xp.asarray(q), *lengths[:2], xp.asarray(k), xp.asarray(v), *lengths[2:],
                    head_dim ** -0.5, out=out, tile_rows=tile_rows)
    want = reference_attention(q, *lengths[:2], k, v, *lengths[2:], head_dim ** -0.5)
    assert relative_error(out.get(), want) < tolerance(dtype)


def reference_mla_decode(q, rows, k_starts, k_lengths, latent, scale):
    """Float64: each sequence's one query [h, W] against its cached rows [k, W], values the
    rows' first ``latent`` columns -> [b, h*latent]."""
    out = []
    for i, (start, length) in enumerate(zip(k_starts, k_lengths)):
        block = rows[start:start + length].astype(np.float64)
        s = q[i].astype(np.float64) @ block.T * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        out.append((p / p.sum(-1, keepdims=True)) @ block[:, :latent])
    return np.stack(out).reshape(len(k_lengths), -1)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
@pytest.mark.parametrize("heads,latent,rope,n_sm", [(4, 12, 4, 1), (20, 512, 64, 1),
                                                    (3, 40, 8, 100000), (16, 64, 16, 132)])
def test_mla_decode_matches_float64(device, dtype, heads, latent, rope, n_sm, monkeypatch):
    """MLA's absorbed decode over the latent cache: one query per sequence, heads in blocks
    of 16 (some partial), lengths around the 32-key blocks, split-K (forced by a large
    device) merged by the attention combine."""
    xp, fused = device
    monkeypatch.setattr(fused, "n_sm", n_sm)
    rng = np.random.default_rng(heads * latent + n_sm % 7)
    k_lengths = rng.permutation(np.array([1, 31, 32, 33, 700]))
    k_starts = np.concatenate([[0], np.cumsum(k_lengths + 3)[:-1]])     # unused tails
    width = latent + rope
    n_rows = int(k_starts[-1] + k_lengths[-1] + 3)
    rows = (rng.standard_normal((n_rows, width)) / 3).astype(dtype)
    q = rng.standard_normal((len(k_lengths), heads, width)).astype(dtype)
    schedule = sch.mla_schedule(k_starts, k_lengths, heads, n_sm)
    assert (schedule.n_slots > 0) == (n_sm > 1)
    out = poisoned(xp, (len(k_lengths), heads * latent), dtype)
    fused.mla_decode(xp.asarray(q), xp.asarray(rows), k_starts, k_lengths, latent, width ** -0.5,
                     out=out)
    got = out.get().astype(np.float64)
    assert np.isfinite(got).all(), "rows left unwritten"
    want = reference_mla_decode(q, rows, k_starts, k_lengths, latent, width ** -0.5)
    assert relative_error(got, want) < tolerance(dtype)


def test_mla_schedule_covers_every_key_block_once():
    k_lengths = np.array([1, 64, 65, 5000, 3])
    k_starts = np.arange(5) * 6000
    for n_sm in (1, 132, 10**5):
        schedule = sch.mla_schedule(k_starts, k_lengths, 128, n_sm)
        tiles = schedule.tiles
        for seq, length in enumerate(k_lengths):
            mine = tiles[tiles[:, 0] == seq]
            blocks = sorted(b for t in mine for b in range(t[3], t[4]))
            assert blocks == list(range(-(-length // sch.MLA_KEYS)))
            assert (mine[:, 1] == k_starts[seq]).all() and (mine[:, 2] == length).all()
            assert (mine[:, 5] >= 0).all() == (len(mine) > 1)
        assert schedule.n_slots == int((tiles[:, 5] >= 0).sum())
        for q_row, n_rows, slot0, n_splits in schedule.combine:
            assert n_rows == 1 and sorted(tiles[tiles[:, 0] == q_row][:, 5]) == list(
                range(slot0, slot0 + n_splits))
    assert len(sch.mla_schedule(k_starts, k_lengths, 128, 1).tiles) == 5      # unsplit
