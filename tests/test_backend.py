"""The array backend's device paths (backend/array.py) on the fake device: the cublasGemmEx
call (row-major product through column-major cuBLAS, float32 accumulation, into a given
output block), and the asynchronous copy of small arrays to the host (counts)."""
import numpy as np
import pytest
from fakes.engine import CHOICE, FakeGpuBackend

from spmd_moe.backend.array import BF16, F32, Backend, BackendChoice, CublasGemm


@pytest.mark.parametrize("out_dtype", [F32, BF16])
@pytest.mark.parametrize("m,k,n", [(5, 3, 7), (1, 8, 1), (16, 32, 4)])
def test_gemm_ex_call_computes_the_row_major_product(fake_gpu, out_dtype, m, k, n):
    rng = np.random.default_rng(m * k * n)
    a = rng.standard_normal((m, k), dtype=np.float32).astype(BF16)
    b = rng.standard_normal((k, n), dtype=np.float32).astype(BF16)
    cp = FakeGpuBackend(CHOICE, "bfloat16", kernels=False).xp
    got = CublasGemm(cp)(cp.asarray(a), cp.asarray(b), out_dtype)
    want = (a.astype(np.float32) @ b.astype(np.float32)).astype(out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    # Same products, maybe another summation order: equal to float32 rounding.
    assert np.allclose(got.get().astype(np.float32), want.astype(np.float32),
                       rtol=1e-2 if out_dtype == BF16 else 1e-5, atol=1e-5)
    assert cp.cuda.cublas.calls == [(n, m, k, 14, 14, 0 if out_dtype == F32 else 14)]
    assert cp.cuda.cublas.mode == 1                 # the handle's pointer mode restored


def test_gemm_ex_writes_into_a_given_output_block(fake_gpu):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 6), dtype=np.float32).astype(BF16)
    b = rng.standard_normal((6, 3), dtype=np.float32).astype(BF16)
    cp = FakeGpuBackend(CHOICE, "bfloat16", kernels=False).xp
    whole = cp.asarray(np.full((9, 3), np.nan, dtype=F32))
    got = CublasGemm(cp)(cp.asarray(a), cp.asarray(b), F32, out=whole[2:6])
    want = a.astype(np.float32) @ b.astype(np.float32)
    host = whole.get()
    assert np.allclose(host[2:6], want, rtol=1e-5, atol=1e-5)
    assert np.isnan(host[:2]).all() and np.isnan(host[6:]).all()
    assert got.data.ptr == whole[2:6].data.ptr


def test_gemm_ex_empty_products(fake_gpu):
    cp = FakeGpuBackend(CHOICE, "bfloat16", kernels=False).xp
    gemm = CublasGemm(cp)
    assert gemm(cp.zeros((0, 4), BF16), cp.zeros((4, 3), BF16), F32).shape == (0, 3)
    zero_k = gemm(cp.zeros((2, 0), BF16), cp.zeros((0, 3), BF16), F32)
    assert zero_k.shape == (2, 3) and not zero_k.get().any()
    assert cp.cuda.cublas.calls == []


def test_matmul_of_bf16_goes_through_cublas_gemm_ex(fake_gpu):
    """bk.matmul: bf16 operands to one cublasGemmEx writing bf16 or float32 (CuPy's matmul
    of bf16 is refused by the fake: it is not that call)."""
    bk = FakeGpuBackend(CHOICE, "bfloat16", kernels=False)
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 3, 8), dtype=np.float32).astype(BF16)
    w = rng.standard_normal((8, 5), dtype=np.float32).astype(BF16)
    got = bk.matmul(bk.asarray(a), bk.param(w), out_dtype=F32)
    want = a.astype(np.float32) @ w.astype(np.float32)
    assert got.shape == (2, 3, 5) and np.allclose(bk.to_host(got), want, rtol=1e-5, atol=1e-5)
    assert len(bk.xp.cuda.cublas.calls) == 1


def test_counts_reach_the_host_by_an_event_not_a_stream_sync(fake_gpu):
    """to_host_async: an asynchronous copy into pinned memory and an event; ``wait`` waits
    for that event only, so work queued after it (the other micro-batch's) stays queued."""
    bk = FakeGpuBackend(CHOICE, "float32", kernels=False)
    waits = []
    fake_gpu.listeners.append(type("Log", (), {"launched": lambda *a: None,
                                               "waited": lambda self, kind: waits.append(
                                                   kind)})())
    fake_gpu.eager = 0
    counts = bk.asarray(np.array([3, 0, 5], dtype=np.int64))
    copy = bk.to_host_async(counts)
    later = bk.asarray(np.ones(4, np.float32)) * 2            # queued after the copy
    assert copy.wait().tolist() == [3, 0, 5] and waits == ["event"]
    assert fake_gpu.pending() > 0                              # the later work still queued
    assert later.get().tolist() == [2, 2, 2, 2]
    numpy = Backend(BackendChoice("numpy", "test"), "float32")
    done = numpy.to_host_async(np.array([1, 2]))
    assert done.event is None and done.wait().tolist() == [1, 2]
