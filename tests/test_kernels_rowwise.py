"""The row-wise kernels (rowwise.cu: RMSNorm with and without the residual add, the last
residual, q/k norm + RoPE, the router's softmax/top-k and expert order) against the generic
array code and float64, on the fake device and on a GPU where usable, and the limits beyond
which a piece is left to the generic code."""
from __future__ import annotations

import numpy as np
import pytest
from fakes.kernels import make_fake_fused
from kernel_cases import dtype_id, poisoned, relative_error, tolerance

from spmd_moe.backend.array import BF16, F32


def generic_backend(dtype):
    from spmd_moe.backend.array import Backend, BackendChoice

    return Backend(BackendChoice("numpy", "test"), "bfloat16" if dtype == BF16 else "float32")


def close_to_generic(got, want, dtype):
    """The kernels' tree sums round differently from NumPy's pairwise ones: the same
    values to float32 rounding, or to one bf16 rounding step."""
    rtol, atol = (2**-7, 2**-7) if dtype == BF16 else (2e-6, 1e-6)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=rtol, atol=atol)


def rms64(x, gain, eps, axis_width=None):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * gain.astype(np.float64)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
@pytest.mark.parametrize("n_rows,d", [(37, 32), (5, 4096), (3, 11), (0, 8), (300, 6)])
def test_rms_norm_kernels_match_the_generic_code_and_float64(device, dtype, n_rows, d):
    from spmd_moe.model import blocks as model

    xp, fused = device
    rng = np.random.default_rng(n_rows + d)
    x, y = (rng.standard_normal((n_rows, d)).astype(dtype) for _ in range(2))
    gain = (1 + 0.1 * rng.standard_normal(d)).astype(dtype)
    out = poisoned(xp, (n_rows, d), dtype)
    fused.rms_norm(xp.asarray(x), xp.asarray(gain), 1e-5, out=out)
    bk = generic_backend(dtype)
    close_to_generic(out.get(), model.rms_norm(bk, x, gain, 1e-5), dtype)
    assert relative_error(out.get(), rms64(x, gain, 1e-5)) < tolerance(dtype)

    moe = rng.standard_normal((n_rows, d)).astype(np.float32)
    summed = fused.residual_add(xp.asarray(x), xp.asarray(moe))
    np.testing.assert_array_equal(summed.get(), model.residual_add(bk, x, moe))   # bit for bit

    h, normed = fused.add_rms_norm(xp.asarray(x), xp.asarray(y), xp.asarray(gain), 1e-5)
    want_h, want = model.add_rms_norm(bk, x, y, gain, 1e-5)
    np.testing.assert_array_equal(h.get(), want_h)            # one rounded float32 add
    close_to_generic(normed.get(), want, dtype)
    assert relative_error(normed.get(), rms64(want_h, gain, 1e-5)) < tolerance(dtype)


def rope64(u, positions, inv_freq, scale=1.0, interleaved=False):
    """Float64 RoPE of u [n, h, D]: pairs (j, j + D/2), or (2j, 2j + 1) written in place."""
    ang = positions.astype(np.float64)[:, None, None] * inv_freq                # [n, 1, D/2]
    c, sn = np.cos(ang) * scale, np.sin(ang) * scale
    if interleaved:
        out = u.copy()
        out[..., 0::2] = u[..., 0::2] * c - u[..., 1::2] * sn
        out[..., 1::2] = u[..., 1::2] * c + u[..., 0::2] * sn
        return out
    half = u.shape[-1] // 2
    c, sn = np.concatenate([c, c], axis=-1), np.concatenate([sn, sn], axis=-1)
    rotated = np.concatenate([-u[..., half:], u[..., :half]], axis=-1)
    return u * c + rotated * sn


ROTATIONS = {"half": (1.0, False, None), "interleaved": (1.0, True, None),
             # YaRN-like: frequencies of their own and cos/sin times an attention factor.
             "scaled": (1.07, True, 0.25)}


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
@pytest.mark.parametrize("kind,rotation", [(kind, "half") for kind in
                                           ("none", "head", "full", "summed")]
                         + [("none", "interleaved"), ("none", "scaled"), ("head", "scaled")])
@pytest.mark.parametrize("n,heads,kv_heads,head_dim", [(29, 4, 2, 16), (5, 8, 8, 128),
                                                       (1, 3, 1, 6), (0, 2, 2, 4)])
def test_qk_norm_rope_matches_the_generic_code_and_float64(device, dtype, kind, rotation, n,
                                                           heads, kv_heads, head_dim):
    """One launch for q and k: each family's q/k norm (``summed``: OLMoE's whole-projection
    norm under TP, from the group's square sums), then RoPE at positions up to 10^4:
    rotate-half, interleaved pairs (DeepSeek), and YaRN's frequencies and cos/sin scale."""
    from spmd_moe.model import blocks as model

    xp, fused = device
    scale, interleaved, slow = ROTATIONS[rotation]
    rng = np.random.default_rng(n * heads + head_dim)
    q = rng.standard_normal((n, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((n, kv_heads, head_dim)).astype(dtype)
    positions = rng.integers(0, 10**4, n).astype(np.int32)
    inv_freq = 1e4 ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if slow is not None:
        inv_freq[len(inv_freq) // 2:] *= slow
    gain_shape = {"head": (head_dim,), "none": (head_dim,)}
    q_gain, k_gain = ((1 + 0.1 * rng.standard_normal(
        gain_shape.get(kind, (h * head_dim,)))).astype(dtype) for h in (heads, kv_heads))
    bk = generic_backend(dtype)
    summed = None
    if kind == "summed":
        # As if another rank held as many more columns with the same sums (width doubled).
        summed = 2 * model.qk_square_sums(bk, q, k)                       # [T, 2]
    generic_kind = "full" if kind == "summed" else kind
    q_width, kv_width = 2 * heads * head_dim, 2 * kv_heads * head_dim
    spec = model.RopeSpec(inv_freq, scale, interleaved)
    want_q, want_k = model.qk_norm_rope(bk, generic_kind, q.copy(), k.copy(), q_gain, k_gain,
                                        1e-6, q_width, kv_width, summed,
                                        model.Rope(bk, positions, spec))
    got_q, got_k = xp.asarray(q), xp.asarray(k)
    fused.qk_norm_rope(generic_kind, got_q, got_k, xp.asarray(q_gain), xp.asarray(k_gain),
                       1e-6, q_width, kv_width, None if summed is None else xp.asarray(summed),
                       xp.asarray(positions), xp.asarray(inv_freq), scale, interleaved)
    for got, want, u, gain in ((got_q, want_q, q, q_gain), (got_k, want_k, k, k_gain)):
        close_to_generic(got.get(), want, dtype)
        u64 = u.astype(np.float64)
        if kind == "head":
            u64 = rms64(u64, gain, 1e-6)
        elif kind in ("full", "summed"):
            flat = u64.reshape(n, u.shape[1] * head_dim)
            mean = (flat * flat).mean(-1, keepdims=True)      # summed: twice over twice the width
            u64 = (flat / np.sqrt(mean + 1e-6) * gain.astype(np.float64)).reshape(u.shape)
        assert relative_error(got.get(), rope64(u64, positions, inv_freq, scale,
                                                interleaved)) < 2 * tolerance(dtype)


@pytest.mark.parametrize("dtype,out_dtype", [(BF16, None), (F32, None), (BF16, F32)],
                         ids=dtype_id)
@pytest.mark.parametrize("n,width", [(7, 24), (0, 8), (300, 130)])
def test_bias_add_matches_the_generic_linear(device, dtype, out_dtype, n, width):
    """blocks.linear's bias (Qwen2-MoE's q/k/v): added to the GEMM's float32 accumulator and
    rounded once, bit for bit the generic ``store(y + b)``; float32 out in place."""
    from spmd_moe.model import blocks as model

    xp, fused = device
    rng = np.random.default_rng(n + width)
    x = rng.standard_normal((n, 16)).astype(dtype)
    w = (rng.standard_normal((16, width)) / 4).astype(np.float32)
    bias = rng.standard_normal(width).astype(np.float32)
    want = model.linear(generic_backend(dtype), x, w, bias, out_dtype)
    y = xp.asarray((x.astype(np.float32) @ w).astype(np.float32))
    got = fused.bias_add(y, xp.asarray(bias), out_dtype or dtype)
    assert got.dtype == want.dtype and np.array_equal(got.get(), want)
    if (out_dtype or dtype) == F32 and n:
        assert got.data.ptr == y.data.ptr                     # in place


@pytest.mark.parametrize("n,n_experts,top_k,renormalize", [
    (37, 8, 2, True), (5, 64, 8, False), (300, 128, 8, True), (3, 256, 4, True),
    (0, 8, 2, True), (33, 5, 5, True), (7, 40, 1, False)])
def test_router_kernel_matches_the_generic_code_and_float64(device, n, n_experts, top_k,
                                                            renormalize):
    """Softmax, k rounds of argmax with ties to the lower expert, renormalised or not; the
    winners exactly the generic code's (exact ties included), weights to float32 rounding.
    Rows with a NaN, a +inf or only -inf logits get the sentinel expert E and weight 0 on
    both paths (some -inf beside a finite maximum are ordinary)."""
    from spmd_moe.moe.router import select

    xp, fused = device
    rng = np.random.default_rng(n + n_experts)
    logits = rng.standard_normal((n, n_experts)).astype(np.float32)
    bad = np.zeros(n, dtype=bool)
    if n > 2:
        logits[1, :] = 0.5                                     # all tied: experts 0..k-1
        logits[2, n_experts // 2:] = logits[2, :n_experts - n_experts // 2].max() + 1
    if n > 8:
        logits[4, n_experts - 1] = np.nan
        logits[5, 0] = np.inf
        logits[6, :] = -np.inf
        logits[7, 1:] = -np.inf                                # finite maximum: ordinary
        bad[4:7] = True
    experts, weights = fused.route(xp.asarray(logits), top_k, renormalize)
    with np.errstate(invalid="ignore"):
        want_e, want_w = select(generic_backend(F32), logits, top_k, renormalize)
    np.testing.assert_array_equal(experts.get(), want_e)
    np.testing.assert_allclose(weights.get(), want_w, rtol=2e-6, atol=1e-7)
    assert (want_e[bad] == n_experts).all() and (want_w[bad] == 0).all()
    assert (want_e[~bad] < n_experts).all()
    good = logits[~bad].astype(np.float64)
    p = np.exp(good - good.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    chosen = np.take_along_axis(p, want_e[~bad].astype(np.int64), axis=-1)
    if renormalize:
        chosen /= chosen.sum(-1, keepdims=True)
    assert relative_error(weights.get()[~bad], chosen) < 1e-5


@pytest.mark.parametrize("n_pairs,n_experts", [(74, 8), (4800, 16), (9, 128), (0, 4),
                                               (1000, 3)])
def test_expert_order_is_the_stable_sort_and_counts(device, n_pairs, n_experts):
    xp, fused = device
    rng = np.random.default_rng(n_pairs)
    # Skewed: some experts get nothing, one gets most.
    experts = np.minimum(rng.geometric(0.3, n_pairs) - 1, n_experts - 1).astype(np.int32)
    experts[::7] = n_experts             # the router's sentinel: non-finite logits
    order, counts = fused.expert_order(xp.asarray(experts.reshape(-1, 1)), n_experts)
    np.testing.assert_array_equal(order.get(), np.argsort(experts, kind="stable"))
    np.testing.assert_array_equal(counts.get(), np.bincount(experts, minlength=n_experts + 1))


def test_router_and_q_k_pieces_beyond_the_kernels_limits_say_so(fake_gpu):
    fused = make_fake_fused()
    assert fused.fit_rowwise(256, 64, 8, "head") is fused
    fitted = fused.fit_rowwise(257, 300, 4, "head")
    assert fused.fuses("router") and not fitted.fuses("router")
    assert not fitted.fuses("qk_rope") and fused.fit_rowwise(8, 300, 4, "full").fuses("qk_rope")
    wide = fused.fit_rowwise(8, 4, 4, "none", head_dim=1024)
    assert wide.fuses("router") and not wide.fuses("qk_rope")
    assert "q/k norm and RoPE: generic array code (head dim 1024; the fused rotation takes " \
        "at most 512)" in wide.describe()
    text = fitted.describe()
    assert "router: generic array code (257 experts; the fused router holds at most 256)" \
        in text and "q/k norm and RoPE: generic array code (300 heads per rank" in text
    assert "router softmax" not in text and "RMSNorm with the residual add" in text
