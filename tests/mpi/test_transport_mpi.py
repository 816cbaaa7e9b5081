"""Every transport's data movers at 2, 3 and 4 ranks (``mpiexec -n N python -m pytest
--with-mpi tests/mpi``): Alltoallv with uneven and zero-count peers, bf16 rows as 16-bit
words, wide rows, the count exchange, allreduce, point-to-point rings, exchanges in flight.

The host transport runs on host arrays; the device transports (mpi-host staging, mpi-cuda,
nccl) run their own code on the asynchronous fake device (tests/fakes/: MPI buffers
checked against queued work at the host call, NCCL calls queued on streams and posted
as MPI when reached). The GPU versions are in tests/test_gpu.py and bin/gpu-check.
"""
import numpy as np
import pytest
from fakes.device import FakeDevice
from fakes.engine import CHOICE, FakeGpuBackend, make_fake_transport
from fakes.mpi import checked_comm
from mpi4py import MPI

from spmd_moe.backend.array import BF16, Backend, choose_backend
from spmd_moe.parallel.transport import HostMpiTransport, TransportChoice

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
KINDS = ["host", "mpi-host", "mpi-cuda", "nccl"]


@pytest.fixture(autouse=True)
def fake_gpu():
    """A fake device per test (each rank its own interleaving)."""
    with FakeDevice(seed=[3, RANK]) as device:
        yield device


def make(kind: str):
    """(transport, array module or None, communicator) of ``kind``."""
    if kind == "host":
        return HostMpiTransport(Backend(choose_backend("numpy"), "bfloat16")), None, WORLD
    backend = FakeGpuBackend(CHOICE, "bfloat16", kernels=False)
    return (make_fake_transport(TransportChoice(kind, "test"), backend), backend.xp,
            checked_comm(WORLD))


def on_device(xp, host: np.ndarray):
    return host if xp is None else xp.asarray(host)


def host(arr) -> np.ndarray:
    return arr.get() if hasattr(arr, "get") else np.asarray(arr)


def bits(arr) -> np.ndarray:
    arr = host(arr)
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
    transport, xp, comm = make(kind)
    for seed, width in ((1, 5), (2, 9), (3, 5), (4, 33)):    # growing and shrinking sizes
        send_counts, recv_counts, send, want = plan(seed, width, BF16, zero_peer)
        recv = transport.ialltoallv(comm, on_device(xp, send), send_counts,
                                    recv_counts).Wait()
        assert recv.dtype == BF16 and recv.shape == want.shape
        assert xp is None or isinstance(recv, xp.ndarray)
        assert np.array_equal(bits(recv), bits(want))
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_then_combine_returns_every_row_home(kind):
    """The engine's pattern: rows out with one pair of counts, back with the reverse."""
    transport, xp, comm = make(kind)
    send_counts, recv_counts, send, want = plan(7, 16, BF16, zero_peer=True)
    there = transport.ialltoallv(comm, on_device(xp, send), send_counts, recv_counts).Wait()
    back = transport.ialltoallv(comm, there, recv_counts, send_counts).Wait()
    assert np.array_equal(bits(back), bits(send))
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_wide_rows_count_in_rows(kind):
    """Rows of 40,000 16-bit words (80 kB): counts stay row counts, offsets are right."""
    transport, xp, comm = make(kind)
    width = 40_000
    send_counts = np.array([1 + (RANK + p) % 2 for p in range(SIZE)])
    recv_counts = np.array([1 + (p + RANK) % 2 for p in range(SIZE)])
    send = np.concatenate([np.full((send_counts[p], width), RANK * SIZE + p, dtype=np.uint16)
                           for p in range(SIZE)])
    recv = transport.ialltoallv(comm, on_device(xp, send.view(BF16)), send_counts,
                                recv_counts).Wait()
    want = np.concatenate([np.full((recv_counts[p], width), p * SIZE + RANK, dtype=np.uint16)
                           for p in range(SIZE)])
    assert np.array_equal(bits(recv), want)
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_float32_and_int64_rows(kind):
    transport, xp, comm = make(kind)
    for dtype in (np.float32, np.int64):
        send_counts, recv_counts, send, want = plan(11, 3, dtype, zero_peer=False)
        recv = transport.ialltoallv(comm, on_device(xp, send), send_counts,
                                    recv_counts).Wait()
        assert np.array_equal(host(recv), want)
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_count_exchange(kind):
    transport, _, comm = make(kind)
    experts_per_rank = 3
    mine = np.array([[RANK * 100 + p * 10 + e for e in range(experts_per_rank)]
                     for p in range(SIZE)])                                    # [P, El]
    got = transport.ialltoall_counts(comm, mine).Wait()
    want = np.array([[p * 100 + RANK * 10 + e for e in range(experts_per_rank)]
                     for p in range(SIZE)])
    assert got.dtype == np.int64 and np.array_equal(got, want)
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_allreduce_in_place(kind):
    transport, xp, comm = make(kind)
    for shape in ((4, 3), (1, 1000)):
        values = np.full(shape, RANK + 1, dtype=np.float32) * np.arange(
            np.prod(shape), dtype=np.float32).reshape(shape)
        arr = on_device(xp, values)
        request = transport.iallreduce_sum(comm, arr)
        assert request.Wait() is arr
        total = SIZE * (SIZE + 1) / 2
        assert np.allclose(host(arr), total * np.arange(np.prod(shape)).reshape(shape))
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_point_to_point_ring(kind):
    """Hidden rows (device) and token ids (host) around a ring, several messages in flight
    per pair, as the pipeline sends micro-batches."""
    transport, xp, comm = make(kind)
    right, left = (RANK + 1) % SIZE, (RANK - 1) % SIZE
    sends, tokens = [], []
    for m in range(3):
        hidden = np.full((2 + m, 6), RANK * 10 + m, dtype=np.float32).astype(BF16)
        sends.append(transport.isend(comm, on_device(xp, hidden), right, tag=11))
        ids = np.array([[RANK], [m]], dtype=np.int64)
        tokens.append(transport.isend(comm, ids, right, tag=12))
    for m in range(3):
        got = transport.irecv(comm, (2 + m, 6), BF16, left, 11).Wait()
        assert xp is None or isinstance(got, xp.ndarray)
        assert np.array_equal(host(got).astype(np.float32),
                              np.full((2 + m, 6), left * 10 + m, dtype=np.float32))
        ids = transport.irecv(comm, (2, 1), np.int64, left, 12).Wait()
        assert type(ids) is np.ndarray and ids[:, 0].tolist() == [left, m]
    for request in sends + tokens:
        request.Wait()
    transport.free()


@pytest.mark.mpi(min_size=2)
def test_nccl_communicators_are_made_once_per_mpi_communicator():
    transport, _, comm = make("nccl")
    stage = comm.Dup()
    first = transport.communicator(stage)
    assert transport.communicator(stage) is first
    other = comm.Dup()
    assert transport.communicator(other) is not first
    assert len(transport.nccl.made) == 2
    transport.free()
    stage.Free()
    other.Free()


# --- exchanges in flight (the overlap of one micro-batch's exchange with another's
# compute) -------------------------------------------------------------------------------

@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_two_exchanges_in_flight_each_get_their_rows(kind):
    """As two micro-batches in flight do: A's combine and B's dispatch both started (in the
    same order on every rank), then waited for in the other order."""
    transport, xp, comm = make(kind)
    first = plan(21, 7, BF16, zero_peer=True)
    second = plan(22, 3, BF16, zero_peer=False)
    started = [transport.ialltoallv(comm, on_device(xp, send), sc, rc)
               for sc, rc, send, _ in (first, second)]
    assert all(hasattr(r, "Test") and hasattr(r, "Wait") for r in started)
    started[0].Test()                     # a poke between compute phases
    got = [started[1].Wait(), started[0].Wait()][::-1]
    for recv, (_, _, _, want) in zip(got, (first, second)):
        assert recv.dtype == BF16 and (xp is None or isinstance(recv, xp.ndarray))
        assert np.array_equal(bits(recv), bits(want))
    transport.free()


@pytest.mark.mpi(min_size=2)
def test_nccl_exchanges_run_on_their_communicator_s_side_stream(fake_gpu):
    """Every NCCL call of an exchange on the communicator's side stream, which waits for
    the compute stream's event; the caller's Wait makes the compute stream wait on the
    device; each communicator (slot of micro-batches in flight) its own side stream."""
    transport, xp, comm = make("nccl")
    send_counts, recv_counts, send, want = plan(23, 5, BF16, zero_peer=False)
    request = transport.ialltoallv(comm, on_device(xp, send), send_counts, recv_counts)
    side = transport.side_stream(comm)
    assert request.start.stream is side and request.done.stream is side
    assert {op.name.split()[0] for op in side.queue if op.kind == "nccl"} == {"nccl"}
    assert not any(op.kind == "nccl" for op in fake_gpu.null_stream.queue)
    assert np.array_equal(bits(request.Wait()), bits(want))
    in_flight, stalled = request.device_times()
    assert in_flight > 0 and stalled >= 0
    other = comm.Dup()
    assert transport.side_stream(other) is not side
    assert transport.side_stream(other) is transport.side_stream(other)
    transport.free()
    other.Free()


@pytest.mark.mpi(min_size=2)
def test_pinned_staging_per_exchange_in_flight_is_reused():
    transport, xp, comm = make("mpi-host")
    send_counts, recv_counts, send, want = plan(24, 16, BF16, zero_peer=False)
    for _ in range(3):
        pair = [transport.ialltoallv(comm, on_device(xp, send), send_counts, recv_counts)
                for _ in range(2)]
        for request in pair:
            assert np.array_equal(bits(request.Wait()), bits(want))
    assert len(transport.exchange_staging) == 2          # one set per exchange in flight
    assert all(set(s.buffers) == {"send", "recv"} for s in transport.exchange_staging)
    transport.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", KINDS)
def test_started_receives_match_in_order(kind):
    """The pipeline's receives, started before they are needed (two micro-batches in
    flight), several from one source at once, completed in any order."""
    transport, xp, comm = make(kind)
    right, left = (RANK + 1) % SIZE, (RANK - 1) % SIZE
    sends = [transport.isend(comm, on_device(xp, np.full((2 + m, 6), RANK * 10 + m,
                                                         dtype=np.float32).astype(BF16)),
                             right, tag=11) for m in range(3)]
    started = [transport.irecv(comm, (2 + m, 6), BF16, left, 11) for m in range(3)]
    tokens = transport.irecv(comm, (1, 1), np.int64, left, 12)
    ids = transport.isend(comm, np.array([[RANK]], dtype=np.int64), right, tag=12)
    for m in (2, 0, 1):
        got = started[m].Wait()
        assert xp is None or isinstance(got, xp.ndarray)
        assert np.array_equal(host(got).astype(np.float32),
                              np.full((2 + m, 6), left * 10 + m, dtype=np.float32))
    assert type(tokens.Wait()) is np.ndarray
    for request in sends + [ids]:
        request.Wait()
    transport.free()
