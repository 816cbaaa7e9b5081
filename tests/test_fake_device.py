"""The asynchronous fake device (tests/fakes/device.py) does what a GPU would: nothing runs
before something waits, freed memory is reused while queued work still uses it, streams
interleave by seed and order only through events, and a missing synchronisation shows as
a wrong number or a DeviceHazard. Each test here fails on a fake that runs work at once."""
from __future__ import annotations

import numpy as np
import pytest
from fakes.cupy import FakeCupy
from fakes.device import DeviceDeadlock, DeviceHazard, FakeDevice, get_elapsed_time
from fakes.mpi import checked_comm
from fakes.nccl import FakeNccl
from mpi4py import MPI


def test_work_runs_only_when_waited_for():
    with FakeDevice(eager=0) as device:
        cp = FakeCupy(device)
        x = cp.asarray(np.arange(6, dtype=np.float32))
        y = x * 2
        assert device.pending() == 2
        assert np.isnan(device.raw(y)).all()             # poisoned: not computed yet
        assert y.get().tolist() == [0, 2, 4, 6, 8, 10]
        assert device.pending() == 0


def test_a_freed_buffer_is_reused_while_queued_work_reads_it():
    """CuPy's pool hands a chunk back when its array dies on the host, although a kernel
    queued on the stream still reads it: writing the next allocation from outside the
    stream (as MPI would) changes what that kernel reads."""
    with FakeDevice(eager=0) as device:
        cp = FakeCupy(device)
        x = cp.asarray(np.ones(128, dtype=np.float32))
        device.synchronize()
        y = x + 1                                        # queued: reads x
        address = x.data.ptr
        del x
        z = cp.empty(128, np.float32)
        assert z.data.ptr == address
        device.raw(z)[...] = 100                         # a write outside the stream
        assert y.get()[0] == 101                         # the kernel read the new data


def test_mpi_on_memory_queued_work_still_writes_is_a_hazard():
    with FakeDevice(eager=0) as device:
        cp = FakeCupy(device)
        x = cp.asarray(np.ones((4, 3), dtype=np.float32))
        comm = checked_comm(MPI.COMM_SELF)
        with pytest.raises(DeviceHazard, match="MPI Isend reads 48 bytes at the host call"):
            comm.Isend(x, dest=0, tag=1)
        x.get()                                          # synchronised: now MPI may read
        request = comm.Isend(x, dest=0, tag=1)
        out = cp.empty((4, 3), np.float32)
        _ = out + 1                                       # queued: reads out
        with pytest.raises(DeviceHazard, match="MPI Irecv writes"):
            comm.Irecv(out, source=0, tag=1)
        out.get()
        comm.Recv(out, source=0, tag=1)
        request.Wait()
        assert (device.raw(out) == 1).all()


def test_streams_order_only_through_events():
    """A copy on a side stream of memory the compute stream writes: without an event the
    fake finds the race (the side stream ran first); with one, the right values."""
    for seed in range(8):
        with FakeDevice(seed=seed, eager=0) as device:
            cp = FakeCupy(device)
            x = cp.asarray(np.arange(4, dtype=np.float32))
            y = x * 3                                     # compute stream
            side = cp.cuda.Stream(non_blocking=True)
            out = cp.empty(4, np.float32)
            with side:
                event = cp.cuda.Event()
                event.record(device.null_stream)
                side.wait_event(event)
                cp.cuda.runtime.memcpyAsync(out.data.ptr, y.data.ptr, 16,
                                            cp.cuda.runtime.memcpyDeviceToDevice, side.ptr)
            side.synchronize()
            assert device.raw(out).tolist() == [0, 3, 6, 9]
    raced = 0
    for seed in range(8):
        with FakeDevice(seed=seed, eager=0) as device:
            cp = FakeCupy(device)
            x = cp.asarray(np.arange(4, dtype=np.float32))
            y = x * 3
            side = cp.cuda.Stream(non_blocking=True)
            out = cp.empty(4, np.float32)
            cp.cuda.runtime.memcpyAsync(out.data.ptr, y.data.ptr, 16,
                                        cp.cuda.runtime.memcpyDeviceToDevice, side.ptr)
            try:
                device.synchronize()
            except DeviceHazard as hazard:
                assert "no event orders them" in str(hazard)
                raced += 1
    assert raced > 0                                     # some seed runs the side stream first


def test_interleavings_differ_by_seed():
    orders = set()
    for seed in range(6):
        with FakeDevice(seed=seed) as device:
            cp = FakeCupy(device)
            streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
            log = []
            for i in range(6):
                device.enqueue(f"op {i}", lambda i=i: log.append(i), stream=streams[i % 2])
            device.synchronize()
            orders.add(tuple(log))
            assert [i for i in log if i % 2 == 0] == [0, 2, 4]     # stream order kept
    assert len(orders) > 1


def test_an_event_query_lets_polling_end_and_times_are_read_after():
    with FakeDevice(eager=0) as device:
        cp = FakeCupy(device)
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        x = cp.asarray(np.zeros(3, np.float32)) + 1
        stop.record()
        with pytest.raises(RuntimeError, match="cudaErrorNotReady"):
            get_elapsed_time(start, stop)
        polls = 0
        while not stop.done:
            polls += 1
        assert polls < 100 and get_elapsed_time(start, stop) > 0
        assert x.get().tolist() == [1, 1, 1]


def test_nccl_calls_that_cannot_match_are_a_device_deadlock():
    with FakeDevice(eager=0, deadlock_s=0.5) as device:
        cp = FakeCupy(device)
        nccl = FakeNccl()
        comm = nccl.communicator(MPI.COMM_SELF)
        buf = cp.zeros(4, np.float32)
        buf.get()
        side = cp.cuda.Stream(non_blocking=True)
        comm.recv(buf.data.ptr, 16, nccl.NCCL_UINT8, 0, side.ptr)   # no send will come
        with pytest.raises(DeviceDeadlock, match="waits in nccl recv peer 0"):
            side.synchronize()
        side.queue[0].requests[0].Cancel()
        side.queue.clear()
        comm.destroy()


def test_host_reads_synchronise_and_bf16_matmul_is_refused():
    from spmd_moe.backend.array import BF16

    with FakeDevice(eager=0) as device:
        cp = FakeCupy(device)
        x = cp.asarray(np.array([3.0], dtype=np.float32)) * 2
        assert float(x.sum()) == 6.0 and device.pending() == 0
        with pytest.raises(TypeError, match="without a device array"):
            cp.exp(np.ones(3))
        with pytest.raises(TypeError, match="host numpy array"):
            x + np.ones(1, np.float32)
        a = cp.asarray(np.ones((2, 2), BF16))
        with pytest.raises(TypeError, match="cublasGemmEx"):
            cp.matmul(a, a)


def test_a_blocking_stream_orders_with_the_legacy_default_stream():
    """CUDA's implicit synchronisation: a stream made without non_blocking waits for the
    default stream's queued work (and the default stream for its), with no event."""
    for seed in range(6):
        with FakeDevice(seed=seed, eager=0) as device:
            cp = FakeCupy(device)
            y = cp.asarray(np.arange(4, dtype=np.float32)) * 3      # default stream
            blocking = cp.cuda.Stream()
            out = cp.empty(4, np.float32)
            cp.cuda.runtime.memcpyAsync(out.data.ptr, y.data.ptr, 16,
                                        cp.cuda.runtime.memcpyDefault, blocking.ptr)
            host = np.zeros(4, np.float32)
            cp.cuda.runtime.memcpy(host.ctypes.data, out.data.ptr, 16,
                                   cp.cuda.runtime.memcpyDeviceToHost)
            assert host.tolist() == [0, 3, 6, 9] and device.pending() == 0
