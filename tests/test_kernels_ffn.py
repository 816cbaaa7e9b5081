"""The expert FFN (expert_ffn.cu and fused.FusedKernels.expert_ffn): cuBLAS GEMMs with one
GELU or SwiGLU pass between them over row chunks, on the fake device and on a GPU where
usable, against float64 and (SwiGLU) the NumPy path's rounding points."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from fakes.cupy import FakeCupy
from fakes.kernels import make_fake_fused
from kernel_cases import dtype_id, poisoned, reference_ffn, relative_error, tolerance

from spmd_moe.backend.array import BF16, F32
from spmd_moe.backend.kernels import schedule as sch


def test_expert_ffn_runs_one_gelu_per_chunk(fake_gpu):
    fused, fake = make_fake_fused(), FakeCupy()
    fused.ffn_workspace_bytes = 128 * 40 * 2                      # 3 passes: 128, 128, 44
    x, w1, w2 = (fake.asarray(np.ones(shape, BF16)) for shape in ((300, 24), (24, 40), (40, 24)))
    fused.expert_ffn(x, w1, w2)
    assert fused.ffn_module.kernels["gelu_bf16_inplace"].launches == 3


def test_ffn_workspace_from_the_environment(fake_gpu, monkeypatch):
    monkeypatch.setenv("SPMD_MOE_FFN_WORKSPACE_MB", "32")
    assert make_fake_fused().ffn_workspace_bytes == 32 << 20


@pytest.mark.parametrize("dtype,out_dtype", [(BF16, None), (F32, None), (BF16, F32)],
                         ids=dtype_id)
@pytest.mark.parametrize("n_rows,d,d_ff", [(1, 32, 40), (300, 64, 200), (1000, 256, 1024)])
def test_expert_ffn_matches_float64(device, dtype, out_dtype, n_rows, d, d_ff, monkeypatch):
    xp, fused = device
    rng = np.random.default_rng(n_rows)
    x = rng.standard_normal((n_rows, d)).astype(dtype)
    w1 = (rng.standard_normal((d, d_ff)) * d ** -0.5).astype(dtype)
    w2 = (rng.standard_normal((d_ff, d)) * d_ff ** -0.5).astype(dtype)
    # A small workspace forces several row chunks (and a short last one).
    monkeypatch.setattr(fused, "ffn_workspace_bytes", 128 * d_ff * dtype.itemsize)
    out = poisoned(xp, (n_rows, d), out_dtype or dtype)
    fused.expert_ffn(xp.asarray(x), xp.asarray(w1), xp.asarray(w2), out_dtype, out=out)
    assert relative_error(out.get(), reference_ffn(x, w1, w2)) < tolerance(dtype)


def reference_swiglu_ffn(x, w1, w2, w3):
    from spmd_moe.moe.experts import silu

    gate = x.astype(np.float64) @ w1.astype(np.float64)
    up = x.astype(np.float64) @ w3.astype(np.float64)
    return (silu(SimpleNamespace(xp=np), gate) * up) @ w2.astype(np.float64)


def swiglu_weights(rng, d, d_ff, dtype):
    return ((rng.standard_normal((d, d_ff)) * d ** -0.5).astype(dtype),
            (rng.standard_normal((d_ff, d)) * d_ff ** -0.5).astype(dtype),
            (rng.standard_normal((d, d_ff)) * d ** -0.5).astype(dtype))


@pytest.mark.parametrize("dtype,out_dtype", [(BF16, None), (F32, None), (BF16, F32)],
                         ids=dtype_id)
@pytest.mark.parametrize("n_rows,d,d_ff", [(1, 32, 40), (301, 64, 197), (1000, 256, 1024)])
def test_swiglu_expert_ffn_matches_float64(device, dtype, out_dtype, n_rows, d, d_ff,
                                           monkeypatch):
    """Odd widths (F = 197: rows of float32 gate/up not 16-byte multiples) and several row
    chunks under a small workspace."""
    xp, fused = device
    rng = np.random.default_rng(n_rows + 1)
    x = rng.standard_normal((n_rows, d)).astype(dtype)
    w1, w2, w3 = swiglu_weights(rng, d, d_ff, dtype)
    monkeypatch.setattr(fused, "ffn_workspace_bytes",
                        128 * d_ff * sch.swiglu_element_bytes(dtype.itemsize))
    out = poisoned(xp, (n_rows, d), out_dtype or dtype)
    fused.expert_ffn(xp.asarray(x), xp.asarray(w1), xp.asarray(w2), out_dtype,
                     w3=xp.asarray(w3), out=out)
    assert relative_error(out.get(), reference_swiglu_ffn(x, w1, w2, w3)) < tolerance(dtype)


@pytest.mark.parametrize("dtype,out_dtype", [(BF16, None), (F32, None), (BF16, F32)],
                         ids=dtype_id)
def test_swiglu_expert_ffn_rounds_where_the_numpy_path_does(device, dtype, out_dtype):
    """Against experts.expert_ffn on NumPy (the generic path, float32 GEMM outputs, the
    product rounded once): bit for bit on the fake device, whose GEMMs and SwiGLU pass are
    that arithmetic; on the GPU within what cuBLAS's summation order and CUDA's expf (2
    ulp) leave, far below one bf16 rounding of the gate or up projections."""
    from spmd_moe.backend.array import Backend, BackendChoice
    from spmd_moe.moe.experts import expert_ffn

    xp, fused = device
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((211, 96)) * 2).astype(dtype)
    w1, w2, w3 = swiglu_weights(rng, 96, 150, dtype)
    numpy_bk = Backend(BackendChoice("numpy", "test"), "bfloat16" if dtype == BF16 else "float32")
    want = expert_ffn(numpy_bk, x, numpy_bk.param(w1), numpy_bk.param(w2), out_dtype,
                      numpy_bk.param(w3))
    got = fused.expert_ffn(xp.asarray(x), xp.asarray(w1), xp.asarray(w2), out_dtype,
                           w3=xp.asarray(w3)).get()
    assert got.dtype == want.dtype
    if xp is np or isinstance(xp, FakeCupy):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    else:
        assert relative_error(got, want) < (2e-3 if got.dtype == BF16 else 1e-6)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
@pytest.mark.parametrize("n", [1, 7, 4096 + 3])
def test_swiglu_pass_matches_the_numpy_product(device, dtype, n):
    """The elementwise pass alone (vector body and tail): silu(gate) * up from float32
    gate and up, rounded once. The fake device is the formula; the GPU's expf may differ
    from NumPy's exp by an ulp or two, which moves a bf16 rounding only at a tie."""
    from spmd_moe.moe.experts import silu

    xp, fused = device
    rng = np.random.default_rng(n)
    gate = (rng.standard_normal(n) * 6).astype(np.float32)
    gate[:3] = [0.0, -120.0, 95.0][:min(3, n)]             # exp(-|g|) underflow, large g
    up = rng.standard_normal(n).astype(np.float32)
    want = (silu(SimpleNamespace(xp=np), gate) * up).astype(dtype)
    out = poisoned(xp, (n,), dtype)
    device_gate = xp.asarray(gate)
    fused.swiglu(device_gate, xp.asarray(up), out)
    got = out.get()
    if dtype == F32:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
        # In place over gate (what the float32 FFN does).
        fused.swiglu(device_gate, xp.asarray(up), device_gate)
        np.testing.assert_allclose(device_gate.get(), want, rtol=1e-6, atol=1e-30)
    else:
        differ = got.view(np.uint16) != want.view(np.uint16)
        assert differ.mean() <= 0.01
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                   rtol=2 ** -7, atol=0)


def test_expert_ffn_runs_one_swiglu_per_chunk_within_the_workspace(fake_gpu):
    fused, fake = make_fake_fused(), FakeCupy()
    element = sch.swiglu_element_bytes(2)
    assert element == 10 and sch.swiglu_element_bytes(4) == 8
    fused.ffn_workspace_bytes = 128 * 40 * element                # 3 passes: 128, 128, 44
    x, w1, w2, w3 = (fake.asarray(np.full(shape, 0.5, BF16))
                     for shape in ((300, 24), (24, 40), (40, 24), (24, 40)))
    made = []
    real_empty = fake.empty
    fake.empty = lambda shape, dtype: (made.append((shape, np.dtype(dtype))),
                                       real_empty(shape, dtype))[1]
    fused.cp = fake
    fused.expert_ffn(x, w1, w2, w3=w3)
    assert fused.ffn_module.kernels["swiglu_bf16"].launches == 3
    assert "gelu_bf16_inplace" not in fused.ffn_module.kernels
    workspace = [(shape, dtype) for shape, dtype in made if shape[-1] == 40]
    assert sorted(workspace, key=str) == sorted([((128, 40), F32), ((128, 40), F32),
                                                 ((128, 40), BF16)], key=str)
