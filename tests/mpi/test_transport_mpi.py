"""Every transport's data movers at 2, 3 and 4 ranks (``mpiexec -n N python -m pytest
--with-mpi tests/mpi``): Alltoallv with uneven and zero-count peers, bf16 rows as 16-bit
words, wide rows, the count exchange, allreduce, and point-to-point rings.

The host transport runs on host arrays; the device transports (mpi-host staging, mpi-cuda,
nccl) run their MPI logic on host memory through ``device.HostArrayOps``, NCCL
through a stand-in made of MPI point-to-point calls. The GPU versions are in
tests/test_gpu.py and bin/gpu-check.
"""
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.backend.array import BF16, Backend, choose_backend
from spmd_moe.parallel.device import HostArrayOps, host_view
from spmd_moe.parallel.mpi_device import CudaAwareMpiTransport, PinnedHostMpiTransport
from spmd_moe.parallel.nccl import NcclTransport
from spmd_moe.parallel.transport import HostMpiTransport, MpiLibrary

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
AWARE = MpiLibrary("Test MPI", None, True, "test: CUDA-aware")


class MpiNccl:
    """NCCL's calls as used by NcclTransport, done with MPI on host memory: grouped
    send/recv post nonblocking messages and complete at ``groupEnd``; a lone send completes
    when the "stream" is synchronised (StreamOps below), as NCCL's does."""

    NCCL_UINT8, NCCL_FLOAT32, NCCL_SUM = 1, 7, 0

    def __init__(self):
        self.group: list | None = None
        self.in_flight: list = []
        self.unique_ids: list = []
        self.streams: list = []          # the stream of every send, recv and allreduce

    def get_unique_id(self):
        return tuple(int(x) for x in np.random.default_rng().integers(-128, 128, 128))

    def groupStart(self):
        assert self.group is None
        self.group = []

    def groupEnd(self):
        MPI.Request.Waitall(self.group)
        self.group = None

    def NcclCommunicator(self, size, unique_id, rank):
        self.unique_ids.append(unique_id)
        return MpiNcclComm(self, size, rank)


class MpiNcclComm:
    def __init__(self, nccl: MpiNccl, size: int, rank: int):
        self.nccl = nccl
        self.comm = WORLD.Dup() if size == SIZE else None
        self.size, self.rank = size, rank

    def send(self, ptr, nbytes, datatype, peer, stream):
        assert datatype == MpiNccl.NCCL_UINT8
        self.nccl.streams.append(stream)
        request = self.comm.Isend(host_view(ptr, nbytes), dest=peer, tag=99)
        (self.nccl.group if self.nccl.group is not None else self.nccl.in_flight).append(
            request)

    def recv(self, ptr, nbytes, datatype, peer, stream):
        assert datatype == MpiNccl.NCCL_UINT8
        self.nccl.streams.append(stream)
        if self.nccl.group is not None:
            self.nccl.group.append(self.comm.Irecv(host_view(ptr, nbytes), source=peer, tag=99))
        else:
            self.comm.Recv(host_view(ptr, nbytes), source=peer, tag=99)

    def allReduce(self, send_ptr, recv_ptr, count, datatype, op, stream):
        assert datatype == MpiNccl.NCCL_FLOAT32 and op == MpiNccl.NCCL_SUM
        assert send_ptr == recv_ptr
        self.nccl.streams.append(stream)
        self.comm.Allreduce(MPI.IN_PLACE, host_view(recv_ptr, 4 * count).view(np.float32))

    def destroy(self):
        self.comm.Free()


class StreamOps(HostArrayOps):
    """HostArrayOps whose synchronize() also completes the stand-in NCCL's lone sends."""

    def __init__(self, nccl: MpiNccl):
        super().__init__()
        self.nccl = nccl

    def synchronize(self):
        MPI.Request.Waitall(self.nccl.in_flight)
        self.nccl.in_flight = []


def backend():
    return Backend(choose_backend("numpy"), "bfloat16")


def make(kind: str):
    """(transport, ops or None) of ``kind``; NCCL communicators are made over WORLD."""
    bk = backend()
    if kind == "host":
        return HostMpiTransport(bk), None
    if kind == "mpi-host":
        ops = HostArrayOps()
        return PinnedHostMpiTransport(bk, "", ops), ops
    if kind == "mpi-cuda":
        ops = HostArrayOps()
        return CudaAwareMpiTransport(bk, "", AWARE, ops), ops
    nccl = MpiNccl()
    ops = StreamOps(nccl)
    return NcclTransport(bk, "", ops, nccl), ops


KINDS = ["host", "mpi-host", "mpi-cuda", "nccl"]


def on_device(ops, host: np.ndarray):
    return host if ops is None else ops.contiguous(host)


def bits(arr) -> np.ndarray:
    arr = np.asarray(arr)
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))


def plan(seed: int, width: int, dtype, zero_peer: bool):
    """Rows each rank sends to each peer (the same table on every rank), and the rows:
    row i of the block for peer p from rank r holds values that name (r, p, i)."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 5, size=(SIZE, SIZE))                  # [sender, receiver]
    if zero_peer:
        for r in range(SIZE):
            table[r, (r + 1) % SIZE] = 0                           # a peer sends nothing
        if SIZE > 2:
            table[:, SIZE - 1] = 0                                 # a rank receives nothing
    def block(sender, receiver):
        n = table[sender, receiver]
        values = (sender * 1000 + receiver * 100 + np.arange(n)[:, None]
                  + np.arange(width)[None, :] / 8.0)
        return values.astype(np.float32).astype(dtype)

    send = np.concatenate([block(RANK, p) for p in range(SIZE)]).reshape(-1, width)
    want = np.concatenate([block(p, RANK) for p in range(SIZE)]).reshape(-1, width)
    return table[RANK], table[:, RANK], send, want


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zero_peer", [False, True])
def test_alltoallv_bf16_rows(kind, zero_peer):
    transport, ops = make(kind)
    for seed, width in ((1, 5), (2, 9), (3, 5), (4, 33)):    # growing and shrinking sizes
        send_counts, recv_counts, send, want = plan(seed, width, BF16, zero_peer)
        recv = transport.alltoallv(WORLD, on_device(ops, send), send_counts, recv_counts)
        assert recv.dtype == BF16 and recv.shape == want.shape
        assert ops is None or ops.is_device(recv)
        assert np.array_equal(bits(recv), bits(want))
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_then_combine_returns_every_row_home(kind):
    """The engine's pattern: rows out with one pair of counts, back with the reverse."""
    transport, ops = make(kind)
    send_counts, recv_counts, send, want = plan(7, 16, BF16, zero_peer=True)
    there = transport.alltoallv(WORLD, on_device(ops, send), send_counts, recv_counts)
    back = transport.alltoallv(WORLD, there, recv_counts, send_counts)
    assert np.array_equal(bits(back), bits(send))
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_wide_rows_count_in_rows(kind):
    """Rows of 40,000 16-bit words (80 kB): counts stay row counts, offsets are right."""
    transport, ops = make(kind)
    width = 40_000
    send_counts = np.array([1 + (RANK + p) % 2 for p in range(SIZE)])
    recv_counts = np.array([1 + (p + RANK) % 2 for p in range(SIZE)])
    send = np.concatenate([np.full((send_counts[p], width), RANK * SIZE + p, dtype=np.uint16)
                           for p in range(SIZE)])
    recv = transport.alltoallv(WORLD, on_device(ops, send.view(BF16)), send_counts,
                               recv_counts)
    want = np.concatenate([np.full((recv_counts[p], width), p * SIZE + RANK, dtype=np.uint16)
                           for p in range(SIZE)])
    assert np.array_equal(bits(recv), want)
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_float32_and_int64_rows(kind):
    transport, ops = make(kind)
    for dtype in (np.float32, np.int64):
        send_counts, recv_counts, send, want = plan(11, 3, dtype, zero_peer=False)
        recv = transport.alltoallv(WORLD, on_device(ops, send), send_counts, recv_counts)
        assert np.array_equal(np.asarray(recv), want)
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_count_exchange(kind):
    transport, _ = make(kind)
    experts_per_rank = 3
    mine = np.array([[RANK * 100 + p * 10 + e for e in range(experts_per_rank)]
                     for p in range(SIZE)])                                    # [P, El]
    got = transport.alltoall_counts(WORLD, mine)
    want = np.array([[p * 100 + RANK * 10 + e for e in range(experts_per_rank)]
                     for p in range(SIZE)])
    assert got.dtype == np.int64 and np.array_equal(got, want)
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_allreduce_in_place(kind):
    transport, ops = make(kind)
    for shape in ((4, 3), (1, 1000)):
        host = np.full(shape, RANK + 1, dtype=np.float32) * np.arange(
            np.prod(shape), dtype=np.float32).reshape(shape)
        arr = on_device(ops, host)
        out = transport.allreduce_sum(WORLD, arr)
        assert out is arr
        total = SIZE * (SIZE + 1) / 2
        assert np.allclose(np.asarray(out), total * np.arange(np.prod(shape)).reshape(shape))
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_point_to_point_ring(kind):
    """Hidden rows (device) and token ids (host) around a ring, several messages in flight
    per pair, as the pipeline sends micro-batches."""
    transport, ops = make(kind)
    right, left = (RANK + 1) % SIZE, (RANK - 1) % SIZE
    sends, tokens = [], []
    for m in range(3):
        hidden = np.full((2 + m, 6), RANK * 10 + m, dtype=np.float32).astype(BF16)
        sends.append(transport.isend(WORLD, on_device(ops, hidden), right, tag=11))
        ids = np.array([[RANK], [m]], dtype=np.int64)
        tokens.append(transport.isend(WORLD, ids, right, tag=12))
    for m in range(3):
        got = transport.recv(WORLD, (2 + m, 6), BF16, left, 11)
        assert ops is None or ops.is_device(got)
        assert np.array_equal(np.asarray(got).astype(np.float32),
                              np.full((2 + m, 6), left * 10 + m, dtype=np.float32))
        ids = transport.recv(WORLD, (2, 1), np.int64, left, 12)
        assert type(ids) is np.ndarray and ids[:, 0].tolist() == [left, m]
    for request in sends + tokens:
        request.Wait()
    transport.free()


@pytest.mark.mpi(min_size=2)
def test_nccl_unique_id_comes_from_rank_0_and_communicators_are_cached():
    transport, _ = make("nccl")
    stage = WORLD.Dup()
    first = transport.communicator(stage)
    assert transport.communicator(stage) is first
    ids = WORLD.allgather(transport.nccl.unique_ids[0])
    assert len(transport.nccl.unique_ids) == 1 and all(i == ids[0] for i in ids)
    other = WORLD.Dup()
    assert transport.communicator(other) is not first
    transport.free()
    stage.Free()
    other.Free()


@pytest.mark.mpi(min_size=2)
def test_pinned_staging_is_reused_across_calls():
    transport, ops = make("mpi-host")
    send_counts, recv_counts, send, _ = plan(5, 64, BF16, zero_peer=False)
    for _ in range(4):
        transport.alltoallv(WORLD, on_device(ops, send), send_counts, recv_counts)
    assert len(ops.allocated) <= 2                    # one send and one receive buffer
    transport.free()


# --- non-blocking exchanges (the overlap of one micro-batch's exchange with another's
# compute) -------------------------------------------------------------------------------

@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_two_exchanges_in_flight_each_get_their_rows(kind):
    """As two micro-batches in flight do: A's combine and B's dispatch both started (in the
    same order on every rank), then waited for in the other order."""
    transport, ops = make(kind)
    first = plan(21, 7, BF16, zero_peer=True)
    second = plan(22, 3, BF16, zero_peer=False)
    started = [transport.ialltoallv(WORLD, on_device(ops, send), sc, rc)
               for sc, rc, send, _ in (first, second)]
    assert all(hasattr(r, "Test") and hasattr(r, "Wait") for r in started)
    started[0].Test()                     # a poke between compute phases
    got = [started[1].Wait(), started[0].Wait()][::-1]
    for recv, (_, _, _, want) in zip(got, (first, second)):
        assert recv.dtype == BF16 and (ops is None or ops.is_device(recv))
        assert np.array_equal(bits(recv), bits(want))
    assert started[0].Test() and started[1].Test()
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_nonblocking_allreduce_sums_in_place(kind):
    transport, ops = make(kind)
    host = np.arange(12, dtype=np.float32).reshape(3, 4) * (RANK + 1)
    arr = on_device(ops, host)
    request = transport.iallreduce_sum(WORLD, arr)
    out = request.Wait()
    assert out is arr
    assert np.allclose(np.asarray(out), np.arange(12).reshape(3, 4) * SIZE * (SIZE + 1) / 2)
    transport.free()


@pytest.mark.mpi(min_size=2)
def test_nccl_exchanges_run_on_the_side_stream():
    """Blocking exchanges on the compute stream (0), started ones on the side stream (1),
    which waits for the compute stream's event; the caller's Wait waits on the device."""
    transport, ops = make("nccl")
    send_counts, recv_counts, send, want = plan(23, 5, BF16, zero_peer=False)
    transport.alltoallv(WORLD, on_device(ops, send), send_counts, recv_counts)
    blocking = set(transport.nccl.streams)
    transport.nccl.streams.clear()
    request = transport.ialltoallv(WORLD, on_device(ops, send), send_counts, recv_counts)
    assert request.start.stream is transport.side_stream(WORLD)
    assert request.done.stream is transport.side_stream(WORLD)
    assert np.array_equal(bits(request.Wait()), bits(want))
    assert blocking == {0} and set(transport.nccl.streams) == {1}
    assert request.device_times() == (0.0, 0.0)          # stand-in events take no time
    # Each communicator (slot of micro-batches in flight) has a side stream of its own.
    other = WORLD.Dup()
    assert transport.side_stream(other) is not transport.side_stream(WORLD)
    assert transport.side_stream(other) is transport.side_stream(other)
    transport.free()
    other.Free()


@pytest.mark.mpi(min_size=2)
def test_pinned_staging_per_exchange_in_flight_is_reused():
    transport, ops = make("mpi-host")
    send_counts, recv_counts, send, want = plan(24, 16, BF16, zero_peer=False)
    for _ in range(3):
        pair = [transport.ialltoallv(WORLD, on_device(ops, send), send_counts, recv_counts)
                for _ in range(2)]
        for request in pair:
            assert np.array_equal(bits(request.Wait()), bits(want))
    assert len(transport.exchange_staging) == 2          # one set per exchange in flight
    assert len(ops.allocated) <= 4                       # a send and a receive buffer each
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_started_receives_match_in_order(kind):
    """The pipeline's receives, started before they are needed (two micro-batches in
    flight), several from one source at once, completed in any order."""
    transport, ops = make(kind)
    right, left = (RANK + 1) % SIZE, (RANK - 1) % SIZE
    sends = [transport.isend(WORLD, on_device(ops, np.full((2 + m, 6), RANK * 10 + m,
                                                           dtype=np.float32).astype(BF16)),
                             right, tag=11) for m in range(3)]
    started = [transport.irecv(WORLD, (2 + m, 6), BF16, left, 11) for m in range(3)]
    tokens = transport.irecv(WORLD, (1, 1), np.int64, left, 12)
    ids = transport.isend(WORLD, np.array([[RANK]], dtype=np.int64), right, tag=12)
    for m in (2, 0, 1):
        got = started[m].Wait()
        assert ops is None or ops.is_device(got)
        assert np.array_equal(np.asarray(got).astype(np.float32),
                              np.full((2 + m, 6), left * 10 + m, dtype=np.float32))
    assert type(tokens.Wait()) is np.ndarray
    for request in sends + [ids]:
        request.Wait()
    transport.free()
