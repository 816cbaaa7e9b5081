"""The dense blocks against SPEC §1 written out in float64."""
import math
from dataclasses import replace

import numpy as np
import pytest

from spmd_moe.backend.array import Backend, BackendChoice, erfc_numpy
from spmd_moe.model.blocks import (RopeSpec, apply_rope, causal_attention, pack, qk_norm,
                                   qk_square_sums, rms_norm, rms_norm_summed, rope_tables)


def bk(dtype="float32"):
    return Backend(BackendChoice("numpy", "test"), dtype)


def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def test_pack_positions_and_starts():
    packed = pack(bk(), np.array([4, 7, 9]), np.array([3, 1, 2]), np.array([0, 5, 2]))
    assert packed.starts_host.tolist() == [0, 3, 4]
    assert packed.positions.tolist() == [0, 1, 2, 5, 2, 3]
    assert packed.last_rows_host.tolist() == [2, 3, 5]
    assert packed.n_tokens == 6


def test_rms_norm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    g = rng.standard_normal(16).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * g
    assert rel(rms_norm(bk(), x, g, 1e-5), want) < 1e-6


def test_rope_is_the_rotate_half_convention():
    rng = np.random.default_rng(2)
    pos = np.array([0, 1, 7, 300], dtype=np.int32)
    u = rng.standard_normal((4, 3, 8)).astype(np.float32)
    cos, sin = rope_tables(bk(), pos, RopeSpec(10000.0 ** (-np.arange(0, 8, 2) / 8)))
    got = apply_rope(bk(), u, cos, sin)
    inv = 10000.0 ** (-2 * np.arange(4) / 8)
    want = np.empty_like(u, dtype=np.float64)
    for t, p in enumerate(pos):
        ang = np.concatenate([p * inv, p * inv])
        rot = np.concatenate([-u[t, :, 4:], u[t, :, :4]], axis=-1)
        want[t] = u[t] * np.cos(ang) + rot * np.sin(ang)
    assert rel(got, want) < 1e-6
    assert np.allclose(got[0], u[0])  # position 0 is the identity


def test_interleaved_rope_rotates_pairs_as_transformers_up_to_its_permutation():
    """DeepSeek's rope_interleave: transformers rotates pairs (2j, 2j+1) and writes them
    de-interleaved ([evens | odds]); we write each pair back in place. Same numbers, a fixed
    permutation, hence the same q.k dot products."""
    rng = np.random.default_rng(3)
    pos = np.array([0, 5, 40], dtype=np.int32)
    q, k = (rng.standard_normal((3, 2, 8)).astype(np.float32) for _ in range(2))
    inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    spec = RopeSpec(inv, 1.0, True)
    cos, sin = rope_tables(bk(), pos, spec)
    got_q, got_k = (apply_rope(bk(), u, cos, sin, interleaved=True) for u in (q, k))

    def transformers_interleave(u):
        ang = pos[:, None, None] * inv                                   # [T, 1, D/2]
        even, odd = u[..., 0::2].astype(np.float64), u[..., 1::2].astype(np.float64)
        return np.concatenate([even * np.cos(ang) - odd * np.sin(ang),
                               odd * np.cos(ang) + even * np.sin(ang)], axis=-1)

    want_q, want_k = transformers_interleave(q), transformers_interleave(k)
    order = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
    assert rel(got_q[..., order], want_q) < 1e-6 and rel(got_k[..., order], want_k) < 1e-6
    dots = np.einsum("thd,thd->th", got_q.astype(np.float64), got_k)
    assert rel(dots, np.einsum("thd,thd->th", want_q, want_k)) < 1e-6


def test_yarn_frequencies_and_scales_are_transformers():
    """YaRN (transformers' _compute_yarn_parameters, written out here): dims past the
    correction range interpolated by the factor, a ramp between; the attention factor from
    mscale/mscale_all_dim times cos and sin; DeepSeek's softmax scale times the
    mscale_all_dim factor squared."""
    import math

    from spmd_moe.core.config import ModelConfig, Yarn
    from spmd_moe.model.blocks import rope_frequencies, rope_spec, softmax_scale

    yarn = Yarn(factor=40.0, original_max=4096, beta_fast=32, beta_slow=1,
                attention_factor=1.0, softmax_mscale=0.1 * 1.0 * math.log(40) + 1)
    model = ModelConfig(vocab_size=8, d_model=64, n_heads=2, n_layers=1, n_experts=2, d_ff=8,
                        attention="mla", d_head=192, rope_dim=64, v_head_dim=128,
                        kv_lora_rank=512, yarn=yarn)
    dim, base = 64, 10000.0

    def correction(rotations):
        return dim * math.log(4096 / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(correction(32)), 0), min(math.ceil(correction(1)), dim - 1)
    freqs = base ** (np.arange(0, dim, 2) / dim)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    want = 1 / (40 * freqs) * ramp + 1 / freqs * (1 - ramp)
    got = rope_frequencies(model)
    assert np.allclose(got, want, rtol=1e-12) and 0 < low < high < dim // 2
    assert got[0] == 1.0 and np.isclose(got[-1], 1 / (40 * freqs[-1]))
    assert np.isclose(softmax_scale(model), 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    scaled = rope_spec(replace(model, yarn=replace(yarn, attention_factor=1.25)))
    cos, sin = rope_tables(bk(), np.array([3], dtype=np.int32), scaled)
    assert np.allclose(cos[0, 0, :32], 1.25 * np.cos(3 * got), rtol=1e-6)


def test_attention_takes_values_of_their_own_width():
    """MLA's prefill: keys of 12, values of 6, one output of h*6 per query."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((7, 2, 12)).astype(np.float32)
    k = rng.standard_normal((7, 2, 12)).astype(np.float32)
    v = rng.standard_normal((7, 2, 6)).astype(np.float32)
    got = causal_attention(bk(), q, np.array([0]), np.array([7]), k, v, np.array([0]),
                           np.array([7]), 0.3)
    assert got.shape == (7, 12)
    assert rel(got, naive_attention(q, k, v, 7, 7, 0.3)) < 1e-6


def naive_attention(q, k, v, q_len, k_len, scale):
    """One sequence: query r sits at position k_len - q_len + r."""
    out = np.zeros((q_len, q.shape[1] * v.shape[2]))
    for h in range(q.shape[1]):
        s = q[:, h].astype(np.float64) @ k[:, h].T.astype(np.float64) * scale
        for r in range(q_len):
            s[r, k_len - q_len + r + 1:] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, h * v.shape[2]:(h + 1) * v.shape[2]] = p @ v[:, h]
    return out


@pytest.mark.parametrize("q_lengths, k_lengths", [
    ([5, 1, 9], [5, 1, 9]),        # prefill, uneven lengths
    ([1, 1, 1], [4, 11, 2]),       # decode step against a cache
    ([3, 0, 2], [7, 6, 2]),        # chunk of new tokens after a prefix; an empty sequence
])
def test_causal_attention_matches_the_masked_softmax(q_lengths, k_lengths):
    rng = np.random.default_rng(3)
    heads, dh, scale = 3, 8, 8 ** -0.5
    q_starts = np.concatenate([[0], np.cumsum(q_lengths)[:-1]])
    k_starts = np.concatenate([[0], np.cumsum(k_lengths)[:-1]]) + 2   # keys need not start at 0
    q = rng.standard_normal((sum(q_lengths), heads, dh)).astype(np.float32)
    k = rng.standard_normal((sum(k_lengths) + 2, heads, dh)).astype(np.float32)
    v = rng.standard_normal((sum(k_lengths) + 2, heads, dh)).astype(np.float32)
    got = causal_attention(bk(), q, q_starts, np.array(q_lengths), k, v, k_starts,
                           np.array(k_lengths), scale)
    for i, (nq, nk) in enumerate(zip(q_lengths, k_lengths)):
        if nq == 0:
            continue
        q0, k0 = q_starts[i], k_starts[i]
        want = naive_attention(q[q0:q0 + nq], k[k0:k0 + nk], v[k0:k0 + nk], nq, nk, scale)
        assert rel(got[q0:q0 + nq], want) < 1e-6


def test_long_sequences_use_query_blocks_and_still_match():
    # 1200 keys x 4 heads: the score tile is split into query blocks (see model/blocks.py).
    rng = np.random.default_rng(4)
    n, heads, dh = 1200, 4, 8
    q, k, v = (rng.standard_normal((n, heads, dh)).astype(np.float32) for _ in range(3))
    starts, lengths = np.array([0]), np.array([n])
    got = causal_attention(bk(), q, starts, lengths, k, v, starts, lengths, 0.3)
    rows = [0, 1, 873, 874, n - 1]
    want = naive_attention(q, k, v, n, n, 0.3)
    assert rel(got[rows], want[rows]) < 1e-6


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_grouped_query_attention_is_attention_with_shared_kv_heads(kv_heads):
    # Query head j uses K/V head j // (h / hk): the same as MHA with each K/V head repeated
    # for its group (what transformers' repeat_kv does), prefill and decode alike.
    rng = np.random.default_rng(5)
    heads, dh, group = 6, 4, 6 // kv_heads
    q_lengths, k_lengths = np.array([5, 1, 3]), np.array([5, 4, 3])
    q_starts = np.array([0, 5, 6])
    k_starts = np.array([0, 5, 9])
    q = rng.standard_normal((9, heads, dh)).astype(np.float32)
    k = rng.standard_normal((12, kv_heads, dh)).astype(np.float32)
    v = rng.standard_normal((12, kv_heads, dh)).astype(np.float32)
    got = causal_attention(bk(), q, q_starts, q_lengths, k, v, k_starts, k_lengths, 0.5)
    want = causal_attention(bk(), q, q_starts, q_lengths, np.repeat(k, group, axis=1),
                            np.repeat(v, group, axis=1), k_starts, k_lengths, 0.5)
    assert rel(got, want) < 1e-6
    # Head 5 of the first sequence, by hand.
    kv = 5 // group
    want5 = naive_attention(q[:5, 5:6], k[:5, kv:kv + 1], v[:5, kv:kv + 1], 5, 5, 0.5)
    assert rel(got[:5, 5 * dh:6 * dh], want5) < 1e-6


def test_qk_norms_of_the_families():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((7, 4, 6)).astype(np.float32)     # [T, h, Dh]
    k = rng.standard_normal((7, 2, 6)).astype(np.float32)     # [T, hk, Dh]
    assert qk_norm(bk(), "none", q, k, None, None, 1e-6, 24, 12) == (q, k)
    g_head = rng.standard_normal(6).astype(np.float32)
    qn, kn = qk_norm(bk(), "head", q, k, g_head, g_head, 1e-6, 24, 12)   # Qwen3-MoE
    q64 = q.astype(np.float64)
    want = q64 / np.sqrt((q64 ** 2).mean(-1, keepdims=True) + 1e-6) * g_head
    assert qn.shape == q.shape and rel(qn, want) < 1e-6
    gq = rng.standard_normal(24).astype(np.float32)
    gk = rng.standard_normal(12).astype(np.float32)
    qn, kn = qk_norm(bk(), "full", q, k, gq, gk, 1e-6, 24, 12)           # OLMoE
    flat = k.reshape(7, 12).astype(np.float64)
    want = flat / np.sqrt((flat ** 2).mean(-1, keepdims=True) + 1e-6) * gk
    assert kn.shape == k.shape and rel(kn.reshape(7, 12), want) < 1e-6


def test_a_full_qk_norm_split_between_ranks_and_on_no_tokens():
    # Two "ranks" hold two heads each of q and one of k; their qk_square_sums, added (the
    # engine's allreduce), give each rank its columns of the whole-projection norm.
    rng = np.random.default_rng(8)
    q = rng.standard_normal((5, 4, 6)).astype(np.float32)     # [T, h, Dh]
    k = rng.standard_normal((5, 2, 6)).astype(np.float32)     # [T, hk, Dh]
    gq = rng.standard_normal(24).astype(np.float32)
    gk = rng.standard_normal(12).astype(np.float32)
    whole = qk_norm(bk(), "full", q, k, gq, gk, 1e-6, 24, 12)
    summed = sum(qk_square_sums(bk(), q[:, 2 * r:2 * r + 2], k[:, r:r + 1])
                 for r in (0, 1))                                          # [T, 2]
    for r in (0, 1):
        h = slice(2 * r, 2 * r + 2)
        qn, kn = qk_norm(bk(), "full", q[:, h], k[:, r:r + 1], gq[12 * r:12 * r + 12],
                         gk[6 * r:6 * r + 6], 1e-6, 24, 12, summed)
        assert rel(qn, whole[0][:, h]) < 1e-6 and rel(kn, whole[1][:, r:r + 1]) < 1e-6
    empty = qk_norm(bk(), "full", q[:0], k[:0], gq, gk, 1e-6, 24, 12)   # an empty chunk
    assert empty[0].shape == (0, 4, 6) and empty[1].shape == (0, 2, 6)


def test_a_norm_over_columns_split_between_ranks():
    # Two "ranks" hold halves of the row; the reduce adds their squares (TP's allreduce).
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 12)).astype(np.float32)
    g = rng.standard_normal(12).astype(np.float32)
    halves = (x[:, :5], x[:, 5:])
    squares = sum((h.astype(np.float32) ** 2).sum(-1, keepdims=True) for h in halves)
    parts = [rms_norm_summed(bk(), h, g[c], 1e-5, 12, squares)
             for h, c in zip(halves, (slice(0, 5), slice(5, 12)))]
    assert rel(np.concatenate(parts, axis=1), rms_norm(bk(), x, g, 1e-5)) < 1e-6


def test_erfc_and_gelu_to_float32_accuracy():
    x = np.linspace(-9, 9, 20001).astype(np.float32)
    want = np.array([math.erfc(float(t)) for t in x])
    assert np.max(np.abs(erfc_numpy(x) - want) / np.maximum(want, 1e-30)) < 2e-7
    gelu = bk().gelu(x)
    want_gelu = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x.astype(float)])
    assert np.max(np.abs(gelu - want_gelu)) < 1e-6
    assert np.all(np.isfinite(gelu)) and gelu[0] == pytest.approx(0.0, abs=1e-12)


def test_bf16_matmul_accumulates_in_float32():
    b = bk("bfloat16")
    rng = np.random.default_rng(5)
    a = rng.standard_normal((16, 4096)).astype(b.dtype)
    w = b.param(rng.standard_normal((4096, 8)).astype(b.dtype))
    got = b.matmul(a, w, out_dtype=np.float32)
    want = a.astype(np.float64) @ w.astype(np.float64)
    assert got.dtype == np.float32 and rel(got, want) < 1e-6
    assert b.matmul(a, w).dtype == b.dtype


def test_blas_threads_are_shared_among_the_node_s_ranks(monkeypatch):
    from spmd_moe.backend.host import BLAS_THREAD_ENV, share_blas_threads

    for name in BLAS_THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert share_blas_threads(2).startswith("BLAS threads 2 per rank (4 cores, 2 rank(s)")
    assert share_blas_threads(8).startswith("BLAS threads 1 per rank")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert share_blas_threads(2) == "BLAS threads left to OMP_NUM_THREADS=3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    share_blas_threads(1)   # leave this process's BLAS as it was found (all cores)
