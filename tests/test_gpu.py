"""The CuPy backend on a real GPU (``@gpu``: skipped without a usable device); the CPU
versions run on the fake device (tests/test_backend.py, tests/mpi/test_fake_gpu.py).

- bf16 operations: which CuPy supports (printed), and the backend's own paths (GemmEx with
  float32 output, the fused GELU, bit-level gathers and scatters) against NumPy;
- the engine on CuPy against NumPy and against the float64 reference, tiny and small, with
  the fused kernels on and off (off exercises the generic array code on the GPU);
- the device transports at one rank with real CuPy arrays: mpi-host staging, NCCL, and
  mpi-cuda only where the MPI library says it is CUDA-aware;
- the bench's layer step and transport measurement on the GPU.

Two ranks sharing the GPU over mpi-host are checked by bin/gpu-check's compare and
transport stages (``spmd-moe run`` and ``spmd-moe bench`` under the launcher).
"""
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.backend.array import BF16, F32, Backend, bf16_census, choose_backend, erfc_numpy
from spmd_moe.core.config import build_run_config
from spmd_moe.engine.testing import (TOLERANCE, check_against_reference, reference_for,
                                     relative_error)
from spmd_moe.model.inputs import synthetic_input
from spmd_moe.model.reference import reference_generate
from spmd_moe.parallel.transport import TransportChoice, mpi_library

gpu = pytest.mark.gpu


# --- on the GPU ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cupy_backend():
    return Backend(choose_backend("cupy"), "bfloat16")


def rel(got, want) -> float:
    return relative_error(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64))


# --- bf16 operations ---------------------------------------------------------------------

# What the engine does to bf16 arrays through bk.xp directly (model/blocks.py, moe/dispatcher.py,
# engine.py): these must work. The rest of the census is reported, not required.
ENGINE_NEEDS = ("asarray/to_host round trip", "astype bf16->f32", "astype f32->bf16",
                "take x[index]", "scatter out[index] = rows", "concatenate", "matmul 2-D bf16")


@gpu
def test_bf16_census(cupy_backend, capsys):
    census = bf16_census(cupy_backend)
    with capsys.disabled():
        print("\nCuPy bfloat16 census:")
        for name, status in census.items():
            print(f"  {name:<32} {status}")
    failing = {name: status for name, status in census.items()
               if status != "ok" and (name.startswith("bk.") or name in ENGINE_NEEDS)}
    assert not failing, failing


@gpu
@pytest.mark.parametrize("m,k,n", [(300, 256, 200), (1, 4096, 16), (17, 40, 12), (0, 8, 5)])
def test_matmul_bf16_with_float32_output(cupy_backend, m, k, n):
    bk = cupy_backend
    rng = np.random.default_rng(m + k + n)
    a = rng.standard_normal((m, k), dtype=np.float32).astype(BF16)
    b = (rng.standard_normal((k, n), dtype=np.float32) * k ** -0.5).astype(BF16)
    want = a.astype(np.float64) @ b.astype(np.float64)
    got = bk.matmul(bk.asarray(a), bk.param(b), out_dtype=F32)
    assert got.dtype == F32 and got.shape == (m, n)
    assert bk.matmul_path.startswith("cublasGemmEx"), bk.matmul_path
    if m:   # float32 accumulation: far below bf16's 4e-3 rounding step
        assert rel(bk.to_host(got), want) < 5e-5
        stored = bk.to_host(bk.matmul(bk.asarray(a), bk.param(b)))
        assert stored.dtype == BF16 and rel(stored, want) < 1e-2
        # The bf16 result is the float32 one rounded once, as on NumPy.
        assert np.array_equal(stored.view(np.uint16),
                              bk.to_host(got).astype(BF16).view(np.uint16)) or \
            rel(stored, bk.to_host(got)) < 4e-3


@gpu
def test_matmul_flattens_leading_dims_and_handles_float32(cupy_backend):
    bk = cupy_backend
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 5, 64), dtype=np.float32).astype(BF16)
    b = rng.standard_normal((64, 8), dtype=np.float32).astype(BF16)
    got = bk.to_host(bk.matmul(bk.asarray(a), bk.asarray(b), out_dtype=F32))
    assert got.shape == (2, 5, 8)
    assert rel(got, a.astype(np.float64) @ b.astype(np.float64)) < 5e-5
    af, bf = a.astype(np.float32), b.astype(np.float32)
    got32 = bk.to_host(bk.matmul(bk.asarray(af), bk.asarray(bf), out_dtype=F32))
    assert rel(got32, af.astype(np.float64) @ bf.astype(np.float64)) < 5e-5


@gpu
def test_fused_gelu_matches_numpy(cupy_backend):
    bk = cupy_backend
    x = np.concatenate([np.linspace(-12, 12, 4001, dtype=np.float32),
                        np.random.default_rng(0).standard_normal(5000, dtype=np.float32)])
    want = 0.5 * x.astype(np.float64) * erfc_numpy(-x / np.float32(np.sqrt(2.0))).astype(
        np.float64)
    got = bk.to_host(bk.gelu(bk.asarray(x)))
    assert np.max(np.abs(got - want)) < 1e-5 * np.max(np.abs(want))
    assert np.all(got[x < -10] <= 0) and np.all(np.isfinite(got))
    buf = bk.asarray(x)
    assert bk.gelu(buf, out=buf) is buf                          # in place
    assert np.array_equal(bk.to_host(buf), got)
    assert bk.to_host(bk.erfc(bk.asarray(x).astype(BF16))).dtype == F32


@gpu
def test_bit_level_gather_and_scatter(cupy_backend):
    bk = cupy_backend
    host = np.random.default_rng(1).standard_normal((9, 5), dtype=np.float32).astype(BF16)
    index = np.array([8, 0, 3, 3, 2])
    got = bk.to_host(bk.take_rows(bk.asarray(host), bk.asarray(index)))
    assert np.array_equal(got.view(np.uint16), host[index].view(np.uint16))
    out = bk.xp.zeros((9, 5), dtype=BF16)
    perm = np.array([4, 1, 7])
    bk.put_rows(out, bk.asarray(perm), bk.asarray(host[:3]))
    want = np.zeros((9, 5), dtype=BF16)
    want[perm] = host[:3]
    assert np.array_equal(bk.to_host(out).view(np.uint16), want.view(np.uint16))
    assert bk.to_host(bk.argmax(bk.asarray(host))).tolist() == \
        host.astype(np.float32).argmax(-1).tolist()
    assert bk.to_host(host) is host                               # host arrays pass through


# --- the engine: CuPy against NumPy and the float64 reference ----------------------------

def run_prefill_outputs(config, batch, backend, transport="auto"):
    from spmd_moe.engine.runner import open_session, run_prefill

    session = open_session(config, MPI.COMM_SELF, batch, backend=backend, transport=transport)
    try:
        return run_prefill(session, batch).outputs, session.transport_choice.name
    finally:
        session.close()


@gpu
@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset,sets", [("tiny", []),
                                         ("tiny", ["pad_fraction=0.4", "batch_size=7"]),
                                         ("small", ["n_layers=2", "batch_size=4",
                                                    "seq_len=96"])])
def test_engine_cupy_matches_numpy_and_reference(monkeypatch, kernels, dtype, preset, sets):
    if kernels == "off":
        monkeypatch.setenv("SPMD_MOE_KERNELS", "0")
    config = build_run_config(preset, sets=[f"dtype={dtype}", *sets])
    batch = synthetic_input(config.workload, config.model, config.seed)
    gpu, _ = run_prefill_outputs(config, batch, "cupy")
    cpu, _ = run_prefill_outputs(config, batch, "numpy")
    check_against_reference(gpu, reference_for(config, batch), dtype)
    for key in ("hidden", "logits"):
        assert rel(gpu[key], cpu[key]) < TOLERANCE[dtype], key
    assert np.all(gpu["hidden"][~batch.mask] == 0)
    if dtype == "float32":
        assert np.array_equal(gpu["expert_counts"], cpu["expert_counts"])
    else:   # bf16 near-ties may route differently; the totals cannot differ
        assert gpu["expert_counts"].sum() == cpu["expert_counts"].sum()


# The checkpoint families' pieces on SPEC §1's model: 8 query heads over 8, 2 or 1 K/V
# heads (groups of 1, 4, 8), SwiGLU experts, head dims 16 and 128 (the published
# families'), with the fused kernels on; the NumPy path is the reference (reference.py is
# SPEC §1's multi-head GELU model only).
GQA_SETS = ["n_heads=8", "activation=swiglu", "pad_fraction=0.3"]


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sets", [["d_head=16", "n_kv_heads=2"], ["d_head=16", "n_kv_heads=1"],
                                  ["d_head=16", "n_kv_heads=8"],
                                  ["d_head=128", "n_kv_heads=2", "n_layers=2", "seq_len=150",
                                   "max_seq_len=160"]])
def test_grouped_query_swiglu_engine_fused_matches_numpy(dtype, sets):
    from spmd_moe.engine.runner import open_session, run_prefill

    config = build_run_config("tiny", sets=[f"dtype={dtype}", *GQA_SETS, *sets])
    batch = synthetic_input(config.workload, config.model, config.seed)
    session = open_session(config, MPI.COMM_SELF, batch, backend="cupy")
    try:
        assert session.backend.kernels is not None, session.backend.kernels_reason
        assert session.backend.kernels.fused_attention, session.backend.kernels_reason
        gpu = run_prefill(session, batch).outputs
    finally:
        session.close()
    cpu, _ = run_prefill_outputs(config, batch, "numpy")
    for key in ("hidden", "logits"):
        assert rel(gpu[key], cpu[key]) < TOLERANCE[dtype], key
    assert np.all(gpu["hidden"][~batch.mask] == 0)


@gpu
def test_grouped_query_decode_on_cupy_gives_numpy_s_tokens():
    """Decode through the fused kernels over a KV cache of the 2 K/V heads (600 cached
    keys: split-K, 5 x 8 CTAs being far from filling the device), float32: NumPy's greedy
    tokens."""
    from spmd_moe.engine.runner import open_session, run_decode

    config = build_run_config("tiny", sets=["dtype=float32", *GQA_SETS, "d_head=16",
                                            "n_kv_heads=2", "seq_len=600", "max_seq_len=610",
                                            "workload=decode", "new_tokens=4"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    tokens = {}
    for backend in ("cupy", "numpy"):
        session = open_session(config, MPI.COMM_SELF, batch, backend=backend, new_tokens=4)
        try:
            tokens[backend] = run_decode(session, batch, 4).outputs["tokens"]
            if backend == "cupy":
                assert session.backend.kernels.fused_attention
        finally:
            session.close()
    assert np.array_equal(tokens["cupy"], tokens["numpy"])


@gpu
@pytest.mark.parametrize("chunk", [1, 3, 37])
def test_chunked_prefill_and_decode_on_cupy(chunk):
    """Chunks attend through the KV cache (the fused kernel with fewer queries than keys);
    decode continues from the cache the prefill filled."""
    from spmd_moe.engine.runner import open_session, run_decode

    config = build_run_config("small", sets=["dtype=float32", "n_layers=2", "batch_size=3",
                                             "seq_len=80", "pad_fraction=0.3",
                                             f"chunk_tokens={chunk}", "workload=decode",
                                             "new_tokens=3"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    session = open_session(config, MPI.COMM_SELF, batch, backend="cupy", new_tokens=3)
    try:
        result = run_decode(session, batch, 3)
    finally:
        session.close()
    assert result.schedule.count > 1 and result.schedule.splits_sequences
    check_against_reference(result.outputs, reference_for(config, batch), "float32")
    want = reference_generate(config.model, batch.ids, batch.mask, 3, config.seed)
    assert np.array_equal(result.outputs["tokens"], want)


@gpu
def test_nccl_side_stream_exchange(cupy_backend):
    """An exchange on the side stream: it waits for the compute stream's writes, the compute
    stream waits for it at Wait (no host sync), and the device times it."""
    from spmd_moe.parallel.connect import make_transport as make

    transport = make(TransportChoice("nccl", "test"), cupy_backend)
    comm = MPI.COMM_SELF.Dup()
    values = cupy_backend.xp.arange(1 << 20, dtype=np.float32)
    values *= 2                                     # queued on the compute stream
    ptr = values.data.ptr
    request = transport._on_side_stream(
        comm, lambda nccl_comm, stream: nccl_comm.allReduce(ptr, ptr, values.size,
                                                            transport.float32, transport.sum,
                                                            stream), values, ())
    assert request.Wait() is values
    values += 1                                     # ordered after the exchange
    cupy_backend.synchronize()
    assert float(values[3]) == 7.0 and request.Test()
    in_flight, stalled = request.device_times()
    assert in_flight >= 0 and stalled >= 0
    transport.free()
    comm.Free()


@gpu
def test_decode_on_cupy_gives_numpy_s_tokens():
    from spmd_moe.engine.runner import open_session, run_decode

    config = build_run_config("tiny", sets=["dtype=float32", "pad_fraction=0.3",
                                            "workload=decode", "new_tokens=4"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    tokens = {}
    for backend in ("cupy", "numpy"):
        session = open_session(config, MPI.COMM_SELF, batch, backend=backend, new_tokens=4)
        try:
            tokens[backend] = run_decode(session, batch, 4).outputs["tokens"]
        finally:
            session.close()
    assert np.array_equal(tokens["cupy"], tokens["numpy"])


@gpu
@pytest.mark.parametrize("transport", ["mpi-host", "nccl"])
def test_engine_over_each_device_transport(transport):
    config = build_run_config("tiny", sets=["dtype=float32"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    got, name = run_prefill_outputs(config, batch, "cupy", transport)
    assert name == transport
    check_against_reference(got, reference_for(config, batch), "float32")


# --- device transports at one rank ---------------------------------------------------------

def device_rows(bk, n, width, seed=0):
    host = np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)
    return host.astype(BF16), bk.asarray(host.astype(BF16))


def exercise_one_rank(bk, transport):
    """ialltoallv (growing, empty, shrinking) and iallreduce through ``transport``."""
    comm = MPI.COMM_SELF
    for n, width in ((5, 64), (0, 64), (300, 128), (7, 128)):
        host, send = device_rows(bk, n, width, n)
        recv = transport.ialltoallv(comm, send, np.array([n]), np.array([n])).Wait()
        assert isinstance(recv, bk.xp.ndarray) and recv.dtype == BF16
        assert np.array_equal(bk.to_host(recv).view(np.uint16), host.view(np.uint16))
    partial = bk.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert transport.iallreduce_sum(comm, partial).Wait() is partial
    assert bk.to_host(partial).ravel().tolist() == list(range(12))
    transport.free()


@gpu
def test_pinned_host_transport_one_rank(cupy_backend):
    from spmd_moe.parallel.mpi_device import PinnedHostMpiTransport
    from spmd_moe.parallel.connect import make_transport as make

    transport = make(TransportChoice("mpi-host", "test"), cupy_backend)
    assert isinstance(transport, PinnedHostMpiTransport)
    exercise_one_rank(cupy_backend, transport)
    transport = make(TransportChoice("mpi-host", "test"), cupy_backend)
    host, hidden = device_rows(cupy_backend, 6, 32, 9)
    request = transport.isend(MPI.COMM_SELF, hidden, 0, tag=11)
    got = transport.irecv(MPI.COMM_SELF, (6, 32), BF16, 0, 11).Wait()
    request.Wait()
    assert np.array_equal(cupy_backend.to_host(got).view(np.uint16), host.view(np.uint16))
    transport.free()


@gpu
def test_nccl_transport_one_rank(cupy_backend):
    from spmd_moe.parallel.nccl import NcclTransport
    from spmd_moe.parallel.connect import make_transport as make

    transport = make(TransportChoice("nccl", "test"), cupy_backend)
    assert isinstance(transport, NcclTransport)
    exercise_one_rank(cupy_backend, transport)
    # A real NCCL communicator of one rank, made from a broadcast unique id, and its
    # allreduce on the compute stream.
    transport = make(TransportChoice("nccl", "test"), cupy_backend)
    comm = MPI.COMM_SELF.Dup()
    nccl_comm = transport.communicator(comm)
    values = cupy_backend.asarray(np.arange(10, dtype=np.float32))
    ptr = values.data.ptr
    nccl_comm.allReduce(ptr, ptr, 10, transport.float32, transport.sum,
                        cupy_backend.stream.ptr)
    assert cupy_backend.to_host(values).tolist() == list(range(10))
    transport.free()
    comm.Free()


@gpu
def test_mpi_cuda_only_where_the_library_says_so(cupy_backend):
    library = mpi_library()
    if not library.cuda_aware:
        from spmd_moe.core.errors import ConfigError
        from spmd_moe.parallel.transport import choose_transport

        with pytest.raises(ConfigError, match="not CUDA-aware"):
            choose_transport("mpi-cuda", "cupy", library, True)
        pytest.skip(f"MPI is not CUDA-aware ({library.cuda_reason}): device buffers must "
                    "never reach it")
    from spmd_moe.parallel.connect import make_transport as make

    exercise_one_rank(cupy_backend, make(TransportChoice("mpi-cuda", "test"), cupy_backend))


# --- the bench on the GPU --------------------------------------------------------------------

@gpu
def test_bench_layer_step_on_gpu(cupy_backend):
    from spmd_moe.perf.bench_shapes import LAYER_PHASES, BenchShape
    from spmd_moe.perf.layer_step import run_layer_step

    shape = BenchShape(seqs=2, seq_len=128, d_model=256, d_ff=512, heads=4, experts=4)
    result = run_layer_step(cupy_backend, shape, iters=2, warmup=1, peer="none")
    assert all(result["phases_ms"][p]["mean"] > 0 for p in LAYER_PHASES)
    assert result["output_finite"] and result["peak"]["tflops"] > 1
    # Both attention tile heights timed on the same inputs, giving the same bits (each
    # row's arithmetic does not depend on the tile height).
    tiles = result["attention_tiles"]
    assert tiles["available"], tiles
    assert set(tiles["ms"]) == {"64", "128"} and tiles["outputs_identical"]


@gpu
@pytest.mark.parametrize("transport", ["mpi-host", "nccl"])
def test_bench_transport_on_gpu(cupy_backend, transport):
    from spmd_moe.parallel.connect import make_transport
    from spmd_moe.perf.bench_shapes import BenchShape
    from spmd_moe.perf.transport_bench import run_transport

    moved = make_transport(TransportChoice(transport, "test"), cupy_backend)
    result = run_transport(MPI.COMM_SELF, cupy_backend, moved,
                           BenchShape(seqs=2, seq_len=64, d_model=128, experts=4), iters=2)
    moved.free()
    assert result["roundtrip_ok"], result["roundtrip_max_abs_error"]
