"""The ``nccl`` transport: one NCCL communicator per MPI communicator, made on first use
from a unique id that rank 0 draws and broadcasts over that communicator.

- Exchanges (``ialltoallv``, ``iallreduce_sum``): the grouped send/recv per peer (or
  the allreduce) on a side stream of the communicator's own that waits for an event
  recorded on the compute stream; ``Wait`` makes the compute stream wait for the side
  stream's done event, so the host never blocks. :meth:`NcclExchange.device_times` gives
  the side stream's time in flight and the compute stream's stall. One side stream per
  communicator (each slot of micro-batches in flight has its own): ranks may start the
  two slots' exchanges in different orders (overlap.run_passes goes on with whichever
  completes first), and one stream would serialise them into a cross-rank deadlock.
- A stage's receive from the previous stage and its send to the next stay on the compute
  stream (one communicator used from two streams is not something NCCL promises to
  order); a send's ``Wait`` waits on the host for an event recorded after it. The host
  never synchronises the device.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backend.array import Backend
from ..core.errors import ConfigError
from .device import DeviceOps
from .mpi_device import DeviceTransport
from .transport import PendingExchange, displacements

# NCCL enum values (nccl.h): used when the CuPy module does not name them.
NCCL_UINT8, NCCL_FLOAT32, NCCL_SUM = 1, 7, 0


class NcclPending:
    """A send enqueued on the compute stream: done once the stream has passed ``done``."""

    def __init__(self, ops: DeviceOps, buffer, done):
        self.ops, self.buffer, self.done = ops, buffer, done

    def Wait(self) -> None:
        self.ops.wait_host(self.done)
        self.buffer = None


class NcclExchange:
    """An exchange enqueued on the side stream (a PendingExchange's interface): complete
    once the side stream has passed ``done``. ``Wait`` makes the compute stream wait for it
    (no host synchronisation) and returns the result; ``device_times`` gives the side
    stream's time for it and how long the compute stream stalled on it."""

    def __init__(self, ops: DeviceOps, result, hold: tuple, start, done):
        self.ops, self.result, self.hold = ops, result, hold
        self.start, self.done = start, done
        self.stall: tuple | None = None

    def Test(self) -> bool:
        return self.ops.event_done(self.done)

    def Wait(self):
        before = self.ops.record_event()
        self.ops.wait_event(self.done)
        self.stall = (before, self.ops.record_event())
        result, self.result, self.hold = self.result, None, ()
        return result

    def device_times(self) -> tuple[float, float | None]:
        """(seconds in flight on the side stream, seconds the compute stream stalled);
        reads events, so the caller has synchronised (after the timed pass)."""
        in_flight = self.ops.elapsed(self.start, self.done)
        stalled = self.ops.elapsed(*self.stall) if self.stall is not None else None
        return in_flight, stalled


class NcclTransport(DeviceTransport):
    """``nccl``: CuPy's NCCL, one communicator per MPI communicator.

    NCCL has no tags: messages between two ranks arrive in the order sent, which is the
    order the engine relies on (it uses one tag per stream of messages).
    """

    name = "nccl"

    def __init__(self, backend: Backend, reason: str = "", ops: DeviceOps | None = None,
                 nccl=None, communicator_factory=None):
        super().__init__(backend, reason, ops)
        if nccl is None:
            from cupy.cuda import nccl
            if not getattr(nccl, "available", True):   # CuPy's stub when libnccl is absent
                raise ConfigError("transport", "nccl requested but CuPy could not load "
                                               "libnccl (cupy.cuda.nccl.available is False)")
        self.nccl = nccl
        self._factory = communicator_factory or self._new_communicator
        self._communicators: dict[int, Any] = {}
        self._sides: dict[int, Any] = {}
        self.uint8 = getattr(nccl, "NCCL_UINT8", NCCL_UINT8)
        self.float32 = getattr(nccl, "NCCL_FLOAT32", NCCL_FLOAT32)
        self.sum = getattr(nccl, "NCCL_SUM", NCCL_SUM)

    def _new_communicator(self, comm):
        """NCCL communicator over the ranks of MPI ``comm`` (collective on ``comm``)."""
        unique_id = self.nccl.get_unique_id() if comm.Get_rank() == 0 else None
        unique_id = comm.bcast(unique_id, root=0)
        return self.nccl.NcclCommunicator(comm.Get_size(), unique_id, comm.Get_rank())

    def communicator(self, comm):
        """The cached NCCL communicator of ``comm``, made on first use (every rank of
        ``comm`` reaches its first use of it at the same collective step). Keyed by the MPI
        handle: the cache lives as long as the transport, which is freed before the
        communicators it served."""
        key = comm.py2f()
        if key not in self._communicators:
            self._communicators[key] = self._factory(comm)
        return self._communicators[key]

    def side_stream(self, comm):
        """The stream ``comm``'s non-blocking exchanges run on, beside the compute stream:
        one per communicator, so that exchanges of two slots in flight never queue behind
        each other (module docstring)."""
        key = comm.py2f()
        if key not in self._sides:
            self._sides[key] = self.ops.side_stream()
        return self._sides[key]

    def _on_side_stream(self, comm, enqueue, result, hold: tuple):
        """Enqueue ``enqueue(nccl_comm, stream_ptr)`` on ``comm``'s side stream once the
        compute stream has produced its inputs; a :class:`NcclExchange` for it."""
        nccl_comm = self.communicator(comm)
        side = self.side_stream(comm)
        self.ops.wait_event(self.ops.record_event(), side)
        start = self.ops.record_event(side)
        enqueue(nccl_comm, self.ops.stream_ptr(side))
        return NcclExchange(self.ops, result, hold, start, self.ops.record_event(side))

    def _ialltoallv_device(self, comm, send, send_counts, recv_counts):
        width, dtype = send.shape[1], send.dtype
        row_bytes = width * dtype.itemsize
        recv = self.ops.empty((int(recv_counts.sum()), width), dtype)
        send_starts, recv_starts = displacements(send_counts), displacements(recv_counts)
        me, peers = comm.Get_rank(), comm.Get_size()
        if send_counts[me]:
            s0, r0, n = int(send_starts[me]), int(recv_starts[me]), int(send_counts[me])
            self.ops.copy(send[s0:s0 + n], recv[r0:r0 + n])
        if peers == 1:
            return PendingExchange([], recv)
        send_ptr, recv_ptr = self.ops.ptr(send), self.ops.ptr(recv)

        def enqueue(nccl_comm, stream):
            self.nccl.groupStart()
            try:
                for peer in range(peers):
                    if peer == me:
                        continue
                    if send_counts[peer]:
                        nccl_comm.send(send_ptr + int(send_starts[peer]) * row_bytes,
                                       int(send_counts[peer]) * row_bytes, self.uint8, peer,
                                       stream)
                    if recv_counts[peer]:
                        nccl_comm.recv(recv_ptr + int(recv_starts[peer]) * row_bytes,
                                       int(recv_counts[peer]) * row_bytes, self.uint8, peer,
                                       stream)
            finally:
                self.nccl.groupEnd()

        return self._on_side_stream(comm, enqueue, recv, (send,))

    def _iallreduce_device(self, comm, arr):
        assert arr.dtype == np.float32, arr.dtype
        if comm.Get_size() == 1:
            return PendingExchange([], arr)
        ptr = self.ops.ptr(arr)
        return self._on_side_stream(
            comm, lambda nccl_comm, stream: nccl_comm.allReduce(ptr, ptr, arr.size,
                                                                self.float32, self.sum, stream),
            arr, ())

    def _isend_device(self, comm, arr, dest, tag):
        self.communicator(comm).send(self.ops.ptr(arr), arr.nbytes, self.uint8, dest,
                                     self.ops.stream_ptr())
        return NcclPending(self.ops, arr, self.ops.record_event())

    def _irecv_device(self, comm, out, source, tag):
        """On the compute stream: the kernels queued after it read ``out`` in order."""
        self.communicator(comm).recv(self.ops.ptr(out), out.nbytes, self.uint8, source,
                                     self.ops.stream_ptr())
        return PendingExchange([], out)

    def free(self) -> None:
        if self._communicators:
            self.ops.synchronize()
        for nccl_comm in self._communicators.values():
            destroy = getattr(nccl_comm, "destroy", None)
            if destroy is not None:
                destroy()
        self._communicators.clear()
        super().free()
