"""Transport selection (pure), the CUDA-awareness query, and every transport's data paths
on one rank. Device transports run here on the asynchronous fake device (tests/fakes/): the
transports' own code on CuPy's array module there, MPI buffers checked against the work
still queued; the multi-rank versions are in tests/mpi/test_transport_mpi.py."""
import ctypes
import itertools
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest
from mpi4py import MPI

from fakes.cupy import DeviceArray
from fakes.engine import CHOICE, FakeGpuBackend, make_fake_transport
from fakes.mpi import checked_comm
from fakes.nccl import FakeNccl

from spmd_moe.backend.array import BF16, Backend, choose_backend
from spmd_moe.core.errors import ConfigError
from spmd_moe.parallel.connect import make_transport
from spmd_moe.parallel.device import CupyOps, PinnedStaging
from spmd_moe.parallel.mpi_device import (CudaAwareMpiTransport, DeviceTransport,
                                          PinnedHostMpiTransport)
from spmd_moe.parallel.nccl import NcclTransport
from spmd_moe.parallel.transport import (CUDA_AWARE_ENV, TRANSPORTS, HostMpiTransport, MpiLibrary,
                                         TransportChoice, choose_transport, mpi_library,
                                         query_cuda_support)

AWARE = MpiLibrary("Test MPI", "/fake/libmpi.so", True, "MPIX_Query_cuda_support() = 1")
UNAWARE = MpiLibrary("Test MPI", "/fake/libmpi.so", False, "MPIX_Query_cuda_support() = 0")


# --- choose_transport: every combination ------------------------------------------------

def expected_choice(requested, backend, cuda_aware, nccl):
    """What SPEC §3 says, written out case by case: a transport name or the error text."""
    if backend == "numpy":
        if requested in ("auto", "mpi-host"):
            return "mpi-host"
        return "error:needs the cupy backend"
    if requested == "mpi-cuda":
        return "mpi-cuda" if cuda_aware else "error:not CUDA-aware"
    if requested == "nccl":
        return "nccl" if nccl else "error:nccl"
    if requested == "mpi-host":
        return "mpi-host"
    return "mpi-cuda" if cuda_aware else "mpi-host"


@pytest.mark.parametrize("requested,backend,cuda_aware,nccl", list(itertools.product(
    TRANSPORTS, ("numpy", "cupy"), (False, True), (False, True))))
def test_choose_transport_every_combination(requested, backend, cuda_aware, nccl):
    library = AWARE if cuda_aware else UNAWARE
    want = expected_choice(requested, backend, cuda_aware, nccl)
    if want.startswith("error:"):
        with pytest.raises(ConfigError) as info:
            choose_transport(requested, backend, library, nccl)
        assert info.value.field == "transport"
        assert want.split(":", 1)[1] in str(info.value)
    else:
        choice = choose_transport(requested, backend, library, nccl)
        assert choice.name == want
        assert choice.reason


def test_mpi_cuda_refusal_names_the_reason():
    with pytest.raises(ConfigError) as info:
        choose_transport("mpi-cuda", "cupy", UNAWARE, nccl_available=True)
    message = str(info.value)
    assert "not CUDA-aware" in message and UNAWARE.cuda_reason in message
    assert "mpi-host" in message                     # and says what to use instead


def test_auto_without_cuda_awareness_says_why_it_stages():
    choice = choose_transport("auto", "cupy", UNAWARE)
    assert choice.name == "mpi-host"
    assert "not CUDA-aware" in choice.reason and UNAWARE.cuda_reason in choice.reason


def test_numpy_refuses_nccl_and_mpi_cuda_even_when_available():
    for requested in ("nccl", "mpi-cuda"):
        with pytest.raises(ConfigError, match="needs the cupy backend"):
            choose_transport(requested, "numpy", AWARE, nccl_available=True)


def test_unknown_transport_lists_the_choices():
    with pytest.raises(ConfigError, match="mpi-cuda, mpi-host, nccl"):
        choose_transport("ucx", "cupy", AWARE, True)


# --- asking the library ---------------------------------------------------------------

class FakeLib:
    """A stand-in for ctypes.CDLL exposing the given functions."""

    def __init__(self, **functions):
        for name, fn in functions.items():
            setattr(self, name, fn)


def open_mpi_query(value):
    def MPIX_Query_cuda_support():
        return value
    return MPIX_Query_cuda_support


def mpich_query(value):
    calls = []

    def MPIX_GPU_query_support(kind, flag_ref):
        calls.append(kind)
        flag_ref._obj.value = value          # what the C function writes through the pointer
        return 0
    MPIX_GPU_query_support.calls = calls
    return MPIX_GPU_query_support


@pytest.mark.parametrize("value", [0, 1])
def test_query_open_mpi_style(value):
    aware, reason = query_cuda_support(FakeLib(MPIX_Query_cuda_support=open_mpi_query(value)))
    assert aware is bool(value)
    assert reason == f"MPIX_Query_cuda_support() = {value}"


@pytest.mark.parametrize("value", [0, 1])
def test_query_mpich_style(value):
    query = mpich_query(value)
    aware, reason = query_cuda_support(FakeLib(MPIX_GPU_query_support=query))
    assert aware is bool(value)
    assert reason == f"MPIX_GPU_query_support(CUDA) = {value}"
    assert query.calls == [0]                  # MPIX_GPU_SUPPORT_CUDA


def test_query_prefers_the_open_mpi_function_when_both_exist():
    lib = FakeLib(MPIX_Query_cuda_support=open_mpi_query(1),
                  MPIX_GPU_query_support=mpich_query(0))
    assert query_cuda_support(lib) == (True, "MPIX_Query_cuda_support() = 1")


def test_query_without_either_function_means_no():
    aware, reason = query_cuda_support(FakeLib())
    assert aware is False and "no CUDA-support query" in reason


def test_query_without_a_library_means_no():
    aware, reason = query_cuda_support(None)
    assert aware is False and "not found" in reason


def test_query_through_real_ctypes():
    """A compiled library answering 1, loaded with ctypes as mpi_library() loads libmpi."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        source, lib = f"{tmp}/q.c", f"{tmp}/libq.so"
        with open(source, "w") as handle:
            handle.write("int MPIX_Query_cuda_support(void) { return 1; }\n")
        subprocess.run([compiler, "-shared", "-fPIC", source, "-o", lib], check=True)
        assert query_cuda_support(ctypes.CDLL(lib)) == (True, "MPIX_Query_cuda_support() = 1")


@pytest.mark.parametrize("value,aware", [("1", True), ("0", False)])
def test_environment_override(monkeypatch, value, aware):
    monkeypatch.setenv(CUDA_AWARE_ENV, value)
    library = mpi_library()
    assert library.cuda_aware is aware
    assert library.cuda_reason == f"forced by {CUDA_AWARE_ENV}={value}"
    assert library.version


def test_without_override_the_library_is_asked(monkeypatch):
    monkeypatch.delenv(CUDA_AWARE_ENV, raising=False)
    library = mpi_library()
    assert "forced" not in library.cuda_reason
    assert isinstance(library.cuda_aware, bool)
    # This venv's MPICH is not built with CUDA: it must say no, never guess yes.
    if "MPICH" in library.version and library.path:
        assert library.cuda_aware is False


def test_an_override_that_is_not_0_or_1_is_ignored(monkeypatch):
    monkeypatch.setenv(CUDA_AWARE_ENV, "yes")
    assert "forced" not in mpi_library().cuda_reason


# --- building transports -------------------------------------------------------------

@pytest.fixture
def numpy_backend():
    return Backend(choose_backend("numpy"), "bfloat16")


@pytest.fixture
def gpu_backend(fake_gpu):
    """The CuPy backend on the fake device."""
    return FakeGpuBackend(CHOICE, "bfloat16", kernels=False)


def test_numpy_backend_gets_the_host_transport(numpy_backend):
    transport = make_transport(TransportChoice("mpi-host", "r"), numpy_backend)
    assert type(transport) is HostMpiTransport and transport.reason == "r"


def test_mpi_cuda_transport_refuses_an_unaware_library(gpu_backend):
    with pytest.raises(AssertionError, match="not CUDA-aware"):
        make_transport(TransportChoice("mpi-cuda", "r"), gpu_backend, library=UNAWARE)


def test_mpi_cuda_transport_checks_again_before_each_call(gpu_backend):
    transport = make_transport(TransportChoice("mpi-cuda", "r"), gpu_backend, library=AWARE)
    assert isinstance(transport, CudaAwareMpiTransport)
    transport.library = UNAWARE           # e.g. a library object replaced after the fact
    send = gpu_backend.xp.zeros((1, 4), BF16)
    with pytest.raises(AssertionError, match="not CUDA-aware"):
        transport.ialltoallv(MPI.COMM_SELF, send, np.array([1]), np.array([1]))


class WaitLog:
    """A fake-device listener: every host wait, by kind."""

    def __init__(self):
        self.waits = []

    def launched(self, kind, name):
        pass

    def waited(self, kind):
        self.waits.append(kind)


@pytest.mark.parametrize("kind", ["mpi-cuda", "mpi-host"])
def test_mpi_waits_for_queued_work_before_touching_device_memory(fake_gpu, gpu_backend, kind):
    """A fresh buffer from CuPy's pool may still be used by queued kernels (its last user
    was freed on the host, not on the stream), and a send buffer may still be written by
    them: the host waits for the stream (one event, never a device synchronisation) before
    MPI touches either. The fake device raises a DeviceHazard otherwise."""
    fake_gpu.eager = 0
    transport = make_fake_transport(TransportChoice(kind, ""), gpu_backend)
    comm = checked_comm(MPI.COMM_SELF)
    xp, log = gpu_backend.xp, WaitLog()
    fake_gpu.listeners.append(log)
    hidden = xp.asarray(np.ones((3, 4), BF16))
    fake_gpu.synchronize()
    queued = hidden * 2                            # still queued: reads hidden's block
    del hidden                                     # ... which the pool hands out again
    log.waits.clear()
    sent = transport.isend(comm, queued, 0, tag=5)
    received = transport.irecv(comm, (3, 4), BF16, source=0, tag=5)
    assert log.waits == ["event", "event"]         # a fence each, no stream synchronise
    got = received.Wait()
    sent.Wait()
    assert (got.get().astype(np.float32) == 2).all()
    transport.free()


def test_nccl_refuses_ranks_sharing_a_gpu(gpu_backend):
    gpu_backend.choice.shared_device = True
    with pytest.raises(ConfigError, match="duplicate devices"):
        make_transport(TransportChoice("nccl", "r"), gpu_backend, nccl=object())
    gpu_backend.choice.shared_device = False


def test_make_kinds(gpu_backend):
    assert isinstance(make_transport(TransportChoice("mpi-host", ""), gpu_backend),
                      PinnedHostMpiTransport)
    assert isinstance(make_transport(TransportChoice("nccl", ""), gpu_backend, nccl=object()),
                      NcclTransport)
    with pytest.raises(ValueError):
        make_transport(TransportChoice("ucx", ""), gpu_backend)


# --- one-rank data paths ----------------------------------------------------------------

def device_transports(backend):
    """(name, transport) for every device transport on the fake device."""
    return [(name, make_fake_transport(TransportChoice(name, ""), backend))
            for name in ("mpi-host", "mpi-cuda", "nccl")]


def bf16_rows(rng, n, width):
    return rng.standard_normal((n, width), dtype=np.float32).astype(BF16)


@pytest.mark.parametrize("index", range(3))
def test_device_transport_one_rank(gpu_backend, index):
    name, transport = device_transports(gpu_backend)[index]
    xp, comm = gpu_backend.xp, checked_comm(MPI.COMM_SELF)
    rng = np.random.default_rng(index)
    for rows in (5, 0, 12):                 # grows, shrinks to nothing, grows again
        host = bf16_rows(rng, rows, 7)
        counts = np.array([rows])
        recv = transport.ialltoallv(comm, xp.asarray(host), counts, counts).Wait()
        assert isinstance(recv, DeviceArray) and recv.dtype == BF16 and recv.shape == (rows, 7)
        assert np.array_equal(recv.get().view(np.uint16), host.view(np.uint16))
    host = rng.standard_normal((3, 4), dtype=np.float32)
    partial = xp.asarray(host)
    assert transport.iallreduce_sum(comm, partial).Wait() is partial
    assert np.array_equal(partial.get(), host)
    counts = transport.ialltoall_counts(comm, np.array([[3, 4]])).Wait()
    assert counts.tolist() == [[3, 4]]
    transport.free()


@pytest.mark.parametrize("index", range(2))
def test_device_transport_send_to_self(gpu_backend, index):
    """isend/irecv with device rows (bf16) and host token ids on one communicator (not NCCL:
    a send to oneself and its receive on one stream wait for each other there too)."""
    name, transport = device_transports(gpu_backend)[index]
    xp, comm = gpu_backend.xp, checked_comm(MPI.COMM_SELF)
    host = bf16_rows(np.random.default_rng(1), 4, 6)
    tokens = np.array([[3], [-1], [7]], dtype=np.int64)
    first = transport.isend(comm, xp.asarray(host), 0, tag=11)
    second = transport.isend(comm, tokens, 0, tag=12)
    got_tokens = transport.irecv(comm, (3, 1), np.int64, 0, 12).Wait()
    got_hidden = transport.irecv(comm, (4, 6), BF16, 0, 11).Wait()
    first.Wait()
    second.Wait()
    assert type(got_tokens) is np.ndarray and np.array_equal(got_tokens, tokens)
    assert isinstance(got_hidden, DeviceArray)
    assert np.array_equal(got_hidden.get().view(np.uint16), host.view(np.uint16))
    transport.free()


def test_host_arrays_take_the_host_path_on_device_transports(gpu_backend):
    for name, transport in device_transports(gpu_backend):
        send = np.arange(6, dtype=np.float32).reshape(3, 2)
        recv = transport.ialltoallv(MPI.COMM_SELF, send, np.array([3]), np.array([3])).Wait()
        assert type(recv) is np.ndarray and np.array_equal(recv, send), name
        transport.free()


def test_recv_places_by_dtype():
    on_host = DeviceTransport._recv_on_host
    assert on_host(np.int64, None) and on_host(np.int32, None) and on_host(bool, None)
    assert not on_host(BF16, None) and not on_host(np.float32, None)
    assert not on_host(np.dtype(ml_dtypes.bfloat16), None)
    assert not on_host(np.int64, False) and on_host(np.float32, True)


def test_nccl_communicator_is_made_once_per_mpi_communicator(gpu_backend):
    nccl = FakeNccl()
    transport = NcclTransport(gpu_backend, "", nccl=nccl, communicator_factory=nccl.communicator)
    comm = MPI.COMM_SELF.Dup()
    partial = gpu_backend.xp.ones((2, 2), dtype=np.float32)
    transport.iallreduce_sum(comm, partial).Wait()     # size 1: no communicator needed
    assert nccl.made == []
    assert transport.communicator(comm) is transport.communicator(comm)
    assert len(nccl.made) == 1
    transport.free()
    comm.Free()


# --- staging buffers ----------------------------------------------------------------------

class CountingOps(CupyOps):
    """CuPy's device ops on the fake device, counting pinned allocations and fences."""

    def __init__(self, cupy):
        super().__init__(cupy)
        self.allocated, self.fences = [], 0

    def pinned(self, nbytes: int):
        self.allocated.append(nbytes)
        return super().pinned(nbytes)

    def fence(self):
        self.fences += 1
        super().fence()


def test_staging_reuses_and_grows_geometrically(gpu_backend):
    ops = CountingOps(gpu_backend.xp)
    staging = PinnedStaging(ops)
    assert staging.get("send", 0).nbytes == 0 and ops.allocated == []
    first = staging.get("send", 100)
    assert first.nbytes == 100 and ops.allocated == [100]
    assert staging.get("send", 80).nbytes == 80 and ops.allocated == [100]   # reused
    assert ops.fences == 0
    assert staging.get("send", 120).nbytes == 120
    assert ops.allocated == [100, 150]             # at least 1.5x: growth stays rare
    assert ops.fences == 1                         # an async copy may read the old buffer
    staging.get("recv", 10)
    assert ops.allocated == [100, 150, 10]         # roles are separate buffers
    staging.free()
    assert staging.buffers == {}


def test_rows_travel_as_rows_not_bytes():
    """Counts are rows of a contiguous datatype: a share whose byte count overflows a C int
    (300,000 rows of 4096 bf16 = 2.4 GB) is still a small row count."""
    transport = HostMpiTransport(Backend(choose_backend("numpy"), "bfloat16"))
    row = transport.row_type(2, 4096)
    assert row.Get_size() == 2 * 4096 and row.Get_extent() == (0, 2 * 4096)
    rows = 300_000
    assert rows * row.Get_size() > 2 ** 31 - 1 > rows
    assert transport.row_type(2, 4096) is row      # committed once, reused
    transport.free()


def test_host_transport_words_are_16_bit_for_bf16():
    x = np.zeros((2, 3), dtype=BF16)
    assert HostMpiTransport.words(x).dtype == np.uint16


def test_one_function_chooses_backend_and_transport():
    """commands (run, bench, info) all open through parallel.connect: the same choice as
    choose_backend and choose_transport would make, NCCL counted only on CuPy."""
    from spmd_moe.parallel.connect import choose_backend_and_transport

    choice, library, transport = choose_backend_and_transport(MPI.COMM_SELF, "numpy", "auto",
                                                              0, 1)
    assert choice.name == "numpy" and library.version
    assert transport == choose_transport("auto", "numpy", library, nccl_available=False)
    with pytest.raises(ConfigError, match="transport"):
        choose_backend_and_transport(MPI.COMM_SELF, "numpy", "nccl", 0, 1)
