"""Dispatch/combine transports for device (CuPy) arrays: ``mpi-cuda``, ``mpi-host``, ``nccl``.

Each is a :class:`~spmd_moe.parallel.transport.HostMpiTransport` with the same methods and contracts
(counts and displacements in rows; ``alltoall_counts`` always on the host), taking and
returning device arrays where the host transport takes host arrays:

- :class:`CudaAwareMpiTransport` (``mpi-cuda``): synchronise the compute stream, then hand
  the CuPy arrays to MPI (mpi4py reads ``__cuda_array_interface__``). Only ever built when
  the MPI library says it is CUDA-aware, and it asserts so again before every call: a device
  pointer given to an MPI that is not CUDA-aware segfaults (Debian's Open MPI 4.1).
- :class:`PinnedHostMpiTransport` (``mpi-host``): rows are copied device -> pinned host
  buffers on the compute stream, MPI runs on the host, and the received rows are copied
  back asynchronously. The buffers are kept and grown, never reallocated per call.
- :class:`NcclTransport` (``nccl``): one NCCL communicator per MPI communicator, made on
  first use from a unique id that rank 0 draws and broadcasts over that communicator;
  Alltoallv is a group of send/recv per peer, all on the compute stream (no host sync).

Non-blocking exchanges (``ialltoallv``, ``iallreduce_sum``; engine.py's overlap of one
micro-batch's dispatch or combine with another's compute) return a
:class:`~spmd_moe.parallel.transport.PendingExchange`:

- ``mpi-cuda``: one ``Isend``/``Irecv`` per peer on the device buffers (point-to-point is
  the part of CUDA-awareness every MPI has; Open MPI's non-blocking collectives copy and
  reduce on the host, which a device pointer would crash), the rows kept on this rank a
  device copy. The allreduce stays blocking on the device: a non-blocking reduction of
  device memory is not something every CUDA-aware MPI does.
- ``mpi-host``: the rows staged through pinned buffers of their own (one set per exchange
  in flight), ``MPI_Ialltoallv``/``MPI_Iallreduce`` on them, copied back in ``Wait``.
- ``nccl``: the grouped send/recv (or the allreduce) on a side stream that waits for an
  event recorded on the compute stream; ``Wait`` makes the compute stream wait for the side
  stream's done event: no host synchronisation, the compute stream keeps running.

A stage's receive from the previous stage (``irecv``) is an ``Irecv`` on the host and on
``mpi-cuda`` (into the device buffer) and ``mpi-host`` (into pinned buffers of its own,
copied in ``Wait``); on ``nccl`` it stays the compute stream's ``recv`` (one communicator
used from two streams is not something NCCL promises to order), so there a micro-batch
waiting for its input holds back the one in flight beside it on the device.

Host arrays (the decode path's int64 token ids) go over plain host MPI on every transport.
``recv`` returns a host array for integer and bool dtypes (token ids are host bookkeeping)
and a device array for every float dtype, bfloat16 included; ``host=`` overrides.

Device work goes through a :class:`DeviceOps` object: :class:`CupyOps` on a GPU;
:class:`HostArrayOps`, which plays the device with host memory, lets the CPU tests run every
transport's MPI logic (offsets, staging, buffer growth and lifetimes) under ``mpiexec``.

Notation: P peers in the communicator, R rows, d words per row.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..backend.array import Backend
from ..core.errors import ConfigError
from .transport import (HostMpiTransport, MpiLibrary, PendingExchange, PendingSend, displacements,
                        mpi_library)

# NCCL enum values (nccl.h): used when the CuPy module does not name them.
NCCL_UINT8, NCCL_FLOAT32, NCCL_SUM = 1, 7, 0
# mpi-cuda's non-blocking exchanges: tags EXCHANGE_TAG_BASE + (n mod EXCHANGE_TAGS), above
# the engine's pipeline tags and within every MPI's guaranteed tag range (32767).
EXCHANGE_TAG_BASE, EXCHANGE_TAGS = 1000, 16384


# --- device primitives -----------------------------------------------------------------

class DeviceOps:
    """What the transports need from the device. All copies are on the compute stream."""

    def is_device(self, arr) -> bool: ...
    def empty(self, shape: tuple[int, ...], dtype: np.dtype): ...
    def contiguous(self, arr): ...
    def ptr(self, arr) -> int: ...
    def pinned(self, nbytes: int) -> tuple[np.ndarray, Any]: ...
    def d2h(self, src, dst: np.ndarray) -> None: ...
    def h2d(self, src: np.ndarray, dst) -> None: ...
    def copy(self, src, dst) -> None: ...
    def synchronize(self) -> None: ...
    def stream_ptr(self, stream=None) -> int: ...
    # Streams and events, for exchanges that run beside the compute stream (NCCL).
    def side_stream(self): ...
    def record_event(self, stream=None): ...
    def wait_event(self, event, stream=None) -> None: ...
    def event_done(self, event) -> bool: ...
    def elapsed(self, start, stop) -> float: ...


class CupyOps(DeviceOps):
    """CuPy arrays on the current device and the current (compute) stream."""

    def __init__(self, cupy=None):
        if cupy is None:
            import cupy
        self.cp = cupy

    def is_device(self, arr) -> bool:
        return isinstance(arr, self.cp.ndarray)

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype=dtype)

    def contiguous(self, arr):
        return self.cp.ascontiguousarray(arr)

    def ptr(self, arr) -> int:
        return int(arr.data.ptr)

    def pinned(self, nbytes: int):
        """``(uint8 host view, owner)``: page-locked memory from CuPy's pinned pool (async
        copies need it); the owner must outlive every copy that uses the view."""
        memory = self.cp.cuda.alloc_pinned_memory(nbytes)
        return np.frombuffer(memory, dtype=np.uint8, count=nbytes), memory

    def d2h(self, src, dst: np.ndarray) -> None:
        assert src.flags.c_contiguous and src.nbytes <= dst.nbytes
        if src.nbytes:
            self.cp.cuda.runtime.memcpyAsync(dst.ctypes.data, src.data.ptr, src.nbytes,
                                             self.cp.cuda.runtime.memcpyDeviceToHost,
                                             self.stream_ptr())

    def h2d(self, src: np.ndarray, dst) -> None:
        assert dst.flags.c_contiguous and dst.nbytes <= src.nbytes
        if dst.nbytes:
            self.cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.ctypes.data, dst.nbytes,
                                             self.cp.cuda.runtime.memcpyHostToDevice,
                                             self.stream_ptr())

    def copy(self, src, dst) -> None:
        """Device-to-device copy of contiguous arrays of equal size (any dtype: bytes)."""
        assert src.flags.c_contiguous and dst.flags.c_contiguous and src.nbytes == dst.nbytes
        if src.nbytes:
            self.cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes,
                                             self.cp.cuda.runtime.memcpyDeviceToDevice,
                                             self.stream_ptr())

    def synchronize(self) -> None:
        self.cp.cuda.get_current_stream().synchronize()

    def stream_ptr(self, stream=None) -> int:
        return int((stream or self.cp.cuda.get_current_stream()).ptr)

    def side_stream(self):
        """A new non-blocking stream (it does not synchronise with the legacy default)."""
        return self.cp.cuda.Stream(non_blocking=True)

    def record_event(self, stream=None):
        """An event recorded now on ``stream`` (default: the compute stream), with timing."""
        event = self.cp.cuda.Event()
        event.record(stream or self.cp.cuda.get_current_stream())
        return event

    def wait_event(self, event, stream=None) -> None:
        """``stream`` (default: the compute stream) waits for ``event`` on the device; the
        host does not."""
        (stream or self.cp.cuda.get_current_stream()).wait_event(event)

    def event_done(self, event) -> bool:
        return bool(event.done)

    def elapsed(self, start, stop) -> float:
        """Seconds between two completed events."""
        stop.synchronize()
        return self.cp.cuda.get_elapsed_time(start, stop) / 1e3


class DeviceArray(np.ndarray):
    """A host array that :class:`HostArrayOps` treats as device memory."""


class HostArrayOps(DeviceOps):
    """Host memory playing the device, for testing the transports' MPI logic on CPUs:
    "device" arrays are :class:`DeviceArray` views, copies are immediate."""

    def __init__(self):
        self.allocated: list[int] = []      # sizes of the pinned buffers made (for tests)

    def is_device(self, arr) -> bool:
        return isinstance(arr, DeviceArray)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype).view(DeviceArray)

    def contiguous(self, arr):
        return np.ascontiguousarray(arr).view(DeviceArray)

    def ptr(self, arr) -> int:
        return int(arr.ctypes.data)

    def pinned(self, nbytes: int):
        self.allocated.append(nbytes)
        buf = np.empty(nbytes, dtype=np.uint8)
        return buf, buf

    def d2h(self, src, dst: np.ndarray) -> None:
        assert src.flags.c_contiguous and src.nbytes <= dst.nbytes
        dst[:src.nbytes] = np.asarray(src).reshape(-1).view(np.uint8)

    def h2d(self, src: np.ndarray, dst) -> None:
        assert dst.flags.c_contiguous and dst.nbytes <= src.nbytes
        np.asarray(dst).reshape(-1).view(np.uint8)[:] = src[:dst.nbytes]

    def copy(self, src, dst) -> None:
        dst[...] = src

    def synchronize(self) -> None:
        pass

    def stream_ptr(self, stream=None) -> int:
        return 0 if stream is None else stream.ptr

    def side_stream(self):
        return HostStream(1)

    def record_event(self, stream=None):
        return HostEvent(stream)

    def wait_event(self, event, stream=None) -> None:
        pass

    def event_done(self, event) -> bool:
        return True

    def elapsed(self, start, stop) -> float:
        return 0.0


class HostStream:
    """A stand-in stream (``ptr`` as NCCL sees it): copies on the host are immediate."""

    def __init__(self, ptr: int):
        self.ptr = ptr


class HostEvent:
    """A stand-in event: what it was recorded on (test stand-ins look at it)."""

    def __init__(self, stream=None):
        self.stream = stream


class PinnedStaging:
    """Grow-only pinned host buffers, one per role ("send", "recv", ...).

    Growing drops the old buffer, which an asynchronous copy may still be reading, so the
    stream is synchronised first; sizes grow by at least 1.5x so that this is rare.
    """

    def __init__(self, ops: DeviceOps):
        self.ops = ops
        self.buffers: dict[str, tuple[np.ndarray, Any]] = {}

    def get(self, role: str, nbytes: int) -> np.ndarray:
        """A uint8 host view, ``nbytes`` long, of the role's buffer (grown if too small)."""
        if nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        view = self.buffers.get(role, (None, None))[0]
        if view is None or view.nbytes < nbytes:
            if view is not None:
                self.ops.synchronize()
            size = max(nbytes, int(1.5 * view.nbytes) if view is not None else 0)
            self.buffers[role] = self.ops.pinned(size)
            view = self.buffers[role][0]
        return view[:nbytes]

    def free(self) -> None:
        if self.buffers:
            self.ops.synchronize()
        self.buffers.clear()


def _word(itemsize: int) -> np.dtype:
    return np.dtype(f"u{itemsize}")


# --- the transports --------------------------------------------------------------------

class DeviceTransport(HostMpiTransport):
    """Common ground: host arrays take the host path; subclasses move device arrays."""

    def __init__(self, backend: Backend, reason: str = "", ops: DeviceOps | None = None):
        super().__init__(backend, reason)
        self.ops = ops if ops is not None else CupyOps(backend.xp if backend.on_gpu else None)

    @staticmethod
    def _recv_on_host(dtype: np.dtype, host: bool | None) -> bool:
        # Integer and bool kinds are host bookkeeping; every float (bfloat16's kind is "V":
        # ml_dtypes types are not numpy.floating subtypes) is device data.
        return np.dtype(dtype).kind in "iub" if host is None else host

    def alltoallv(self, comm, send, send_counts: np.ndarray, recv_counts: np.ndarray):
        """send: [R, d] rows grouped by destination peer (device) -> [sum(recv_counts), d]
        grouped by source peer (device). Counts are rows, host int64 [P]."""
        if not self.ops.is_device(send):
            return super().alltoallv(comm, send, send_counts, recv_counts)
        return self._alltoallv_device(comm, *self._device_rows(send, send_counts, recv_counts))

    def allreduce_sum(self, comm, arr):
        """In-place sum over ranks of a float32 array (device or host); returns it."""
        if not self.ops.is_device(arr):
            return super().allreduce_sum(comm, arr)
        assert arr.flags.c_contiguous, "allreduce works in place on contiguous arrays"
        return self._allreduce_device(comm, arr)

    def ialltoallv(self, comm, send, send_counts: np.ndarray, recv_counts: np.ndarray):
        """Start :meth:`alltoallv`; ``Wait()`` returns the received rows (device)."""
        if not self.ops.is_device(send):
            return super().ialltoallv(comm, send, send_counts, recv_counts)
        return self._ialltoallv_device(comm, *self._device_rows(send, send_counts, recv_counts))

    def _device_rows(self, send, send_counts, recv_counts):
        """An all-to-all's device arguments, checked: contiguous [R, d] rows (R the sum of
        ``send_counts``) and the counts as host int64."""
        assert send.ndim == 2 and int(send_counts.sum()) == send.shape[0], (
            send.shape, send_counts)
        return (self.ops.contiguous(send), np.asarray(send_counts, dtype=np.int64),
                np.asarray(recv_counts, dtype=np.int64))

    def iallreduce_sum(self, comm, arr):
        """Start :meth:`allreduce_sum`; ``Wait()`` returns ``arr``, summed."""
        if not self.ops.is_device(arr):
            return super().iallreduce_sum(comm, arr)
        assert arr.flags.c_contiguous, "allreduce works in place on contiguous arrays"
        return self._iallreduce_device(comm, arr)

    def isend(self, comm, arr, dest: int, tag: int):
        """Start sending ``arr`` (device or host); ``Wait()`` on the result ends it."""
        if not self.ops.is_device(arr):
            return super().isend(comm, arr, dest, tag)
        return self._isend_device(comm, self.ops.contiguous(arr), dest, tag)

    def recv(self, comm, shape: tuple[int, ...], dtype: np.dtype, source: int, tag: int,
             host: bool | None = None):
        """Receive an array of ``shape``: on the host for integer and bool dtypes (token
        ids), on the device for float dtypes, unless ``host`` says otherwise."""
        if self._recv_on_host(dtype, host):
            return super().recv(comm, shape, dtype, source, tag)
        out = self.ops.empty(tuple(shape), np.dtype(dtype))
        self._recv_device(comm, out, source, tag)
        return out

    def irecv(self, comm, shape: tuple[int, ...], dtype: np.dtype, source: int, tag: int,
              host: bool | None = None):
        """Start :meth:`recv`; ``Wait()`` returns the array (host or device as ``recv``)."""
        if self._recv_on_host(dtype, host):
            return super().irecv(comm, shape, dtype, source, tag)
        out = self.ops.empty(tuple(shape), np.dtype(dtype))
        return self._irecv_device(comm, out, source, tag)

    def _irecv_device(self, comm, out, source, tag):
        """A receive into device memory, already complete: the transports that can start
        one without blocking override this."""
        self._recv_device(comm, out, source, tag)
        return PendingExchange([], out)

    # Subclasses implement these on device arrays.
    def _alltoallv_device(self, comm, send, send_counts, recv_counts): ...
    def _allreduce_device(self, comm, arr): ...
    def _ialltoallv_device(self, comm, send, send_counts, recv_counts): ...
    def _iallreduce_device(self, comm, arr): ...
    def _isend_device(self, comm, arr, dest, tag): ...
    def _recv_device(self, comm, out, source, tag) -> None: ...


class CudaAwareMpiTransport(DeviceTransport):
    """``mpi-cuda``: device buffers straight into a CUDA-aware MPI."""

    name = "mpi-cuda"

    def __init__(self, backend: Backend, reason: str, library: MpiLibrary,
                 ops: DeviceOps | None = None):
        # choose_transport never picks mpi-cuda for an MPI that is not CUDA-aware; this is
        # the second lock on that door, because the failure mode is a segfault.
        assert library.cuda_aware, (
            f"mpi-cuda with an MPI that is not CUDA-aware ({library.cuda_reason})")
        super().__init__(backend, reason, ops)
        self.library = library
        self._tags: dict[int, int] = {}

    def _check(self) -> None:
        assert self.library.cuda_aware, "device buffer for an MPI that is not CUDA-aware"

    def _alltoallv_device(self, comm, send, send_counts, recv_counts):
        self._check()
        width, item = send.shape[1], send.dtype.itemsize
        recv = self.ops.empty((int(recv_counts.sum()), width), send.dtype)
        rows = self.row_type(item, width)
        # MPI reads device memory directly, outside the stream: the kernels that wrote
        # ``send`` must have finished.
        self.ops.synchronize()
        comm.Alltoallv([send.view(_word(item)), (send_counts, displacements(send_counts)),
                        rows],
                       [recv.view(_word(item)), (recv_counts, displacements(recv_counts)),
                        rows])
        return recv

    def _allreduce_device(self, comm, arr):
        from mpi4py import MPI

        self._check()
        self.ops.synchronize()
        comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        return arr

    def _ialltoallv_device(self, comm, send, send_counts, recv_counts):
        """One Isend/Irecv per peer on device memory (see the module docstring), under a tag
        of its own: every rank of ``comm`` counts its exchanges in the same order."""
        self._check()
        width, item = send.shape[1], send.dtype.itemsize
        recv = self.ops.empty((int(recv_counts.sum()), width), send.dtype)
        send_starts, recv_starts = displacements(send_counts), displacements(recv_counts)
        me = comm.Get_rank()
        if send_counts[me]:
            s0, r0, n = int(send_starts[me]), int(recv_starts[me]), int(send_counts[me])
            self.ops.copy(send[s0:s0 + n], recv[r0:r0 + n])
        rows = self.row_type(item, width)
        tag = self._exchange_tag(comm)
        self.ops.synchronize()      # MPI reads ``send`` outside the stream
        requests = []
        for peer in range(comm.Get_size()):
            if peer == me:
                continue
            if recv_counts[peer]:
                r0, n = int(recv_starts[peer]), int(recv_counts[peer])
                requests.append(comm.Irecv([recv[r0:r0 + n].view(_word(item)), n, rows],
                                           source=peer, tag=tag))
            if send_counts[peer]:
                s0, n = int(send_starts[peer]), int(send_counts[peer])
                requests.append(comm.Isend([send[s0:s0 + n].view(_word(item)), n, rows],
                                           dest=peer, tag=tag))
        return PendingExchange(requests, recv, hold=(send,))

    def _irecv_device(self, comm, out, source, tag):
        self._check()
        return PendingExchange([comm.Irecv(out.view(_word(out.dtype.itemsize)), source=source,
                                           tag=tag)], out)

    def _exchange_tag(self, comm) -> int:
        key = comm.py2f()
        self._tags[key] = (self._tags.get(key, -1) + 1) % EXCHANGE_TAGS
        return EXCHANGE_TAG_BASE + self._tags[key]

    def _iallreduce_device(self, comm, arr):
        # Blocking on the device: see the module docstring.
        return PendingExchange([], self._allreduce_device(comm, arr))

    def _isend_device(self, comm, arr, dest, tag):
        self._check()
        self.ops.synchronize()
        return PendingSend(comm.Isend(arr.view(_word(arr.dtype.itemsize)), dest=dest,
                                      tag=tag), arr)

    def _recv_device(self, comm, out, source, tag) -> None:
        self._check()
        # ``out`` is fresh from CuPy's pool, which hands back a block as soon as its last
        # user was freed on the host: kernels still queued on the stream may read it. MPI
        # writes it from outside the stream, so the stream must be drained first.
        self.ops.synchronize()
        comm.Recv(out.view(_word(out.dtype.itemsize)), source=source, tag=tag)


class PinnedHostMpiTransport(DeviceTransport):
    """``mpi-host``: device rows staged through reused pinned host buffers."""

    name = "mpi-host"

    def __init__(self, backend: Backend, reason: str = "", ops: DeviceOps | None = None):
        super().__init__(backend, reason, ops)
        self.staging = PinnedStaging(self.ops)
        # Staging for exchanges in flight: a set of buffers each, back to the pool on Wait.
        self.exchange_staging: list[PinnedStaging] = []
        self._free_staging: list[PinnedStaging] = []

    def _take_staging(self) -> PinnedStaging:
        if not self._free_staging:
            self.exchange_staging.append(PinnedStaging(self.ops))
            return self.exchange_staging[-1]
        return self._free_staging.pop()

    def _ialltoallv_device(self, comm, send, send_counts, recv_counts):
        width, dtype = send.shape[1], send.dtype
        item = dtype.itemsize
        n_recv = int(recv_counts.sum())
        staging = self._take_staging()
        send_host = staging.get("send", send.nbytes)
        recv_host = staging.get("recv", n_recv * width * item)
        self.ops.d2h(send, send_host)
        # MPI reads the host copy, and writes a buffer whose last host->device copy (an
        # earlier exchange's) may still be queued: both need the stream drained.
        self.ops.synchronize()
        rows = self.row_type(item, width)
        request = comm.Ialltoallv([send_host.view(_word(item)),
                                   (send_counts, displacements(send_counts)), rows],
                                  [recv_host.view(_word(item)),
                                   (recv_counts, displacements(recv_counts)), rows])

        def finish(_):
            recv = self.ops.empty((n_recv, width), dtype)
            self.ops.h2d(recv_host, recv)     # queued on the compute stream
            self._free_staging.append(staging)
            return recv

        return PendingExchange([request], None, hold=(send,), finish=finish)

    def _irecv_device(self, comm, out, source, tag):
        staging = self._take_staging()
        host = staging.get("p2p", out.nbytes)
        # The buffer's last host->device copy (an earlier exchange's) may still be queued.
        self.ops.synchronize()
        request = comm.Irecv(host.view(_word(out.dtype.itemsize)), source=source, tag=tag)

        def finish(result):
            self.ops.h2d(host, result)
            self._free_staging.append(staging)
            return result

        return PendingExchange([request], out, finish=finish)

    def _iallreduce_device(self, comm, arr):
        from mpi4py import MPI

        staging = self._take_staging()
        host = staging.get("allreduce", arr.nbytes)
        self.ops.d2h(arr, host)
        self.ops.synchronize()
        request = comm.Iallreduce(MPI.IN_PLACE, host.view(arr.dtype), op=MPI.SUM)

        def finish(result):
            self.ops.h2d(host, result)
            self._free_staging.append(staging)
            return result

        return PendingExchange([request], arr, finish=finish)

    def _alltoallv_device(self, comm, send, send_counts, recv_counts):
        width, dtype = send.shape[1], send.dtype
        item = dtype.itemsize
        n_recv = int(recv_counts.sum())
        send_host = self.staging.get("send", send.nbytes)
        recv_host = self.staging.get("recv", n_recv * width * item)
        self.ops.d2h(send, send_host)
        # MPI reads the host copy (and overwrites the receive buffer, which the previous
        # call's host->device copy may still be reading): both need the stream drained.
        self.ops.synchronize()
        rows = self.row_type(item, width)
        comm.Alltoallv([send_host.view(_word(item)),
                        (send_counts, displacements(send_counts)), rows],
                       [recv_host.view(_word(item)),
                        (recv_counts, displacements(recv_counts)), rows])
        recv = self.ops.empty((n_recv, width), dtype)
        self.ops.h2d(recv_host, recv)      # async: the next compute kernels queue behind it
        return recv

    def _allreduce_device(self, comm, arr):
        from mpi4py import MPI

        host = self.staging.get("allreduce", arr.nbytes)
        self.ops.d2h(arr, host)
        self.ops.synchronize()
        comm.Allreduce(MPI.IN_PLACE, host.view(arr.dtype), op=MPI.SUM)
        self.ops.h2d(host, arr)
        return arr

    def _isend_device(self, comm, arr, dest, tag):
        # A buffer of its own: several sends may be in flight (pipeline micro-batches).
        host, owner = self.ops.pinned(max(1, arr.nbytes))
        host = host[:arr.nbytes]
        self.ops.d2h(arr, host)
        self.ops.synchronize()
        request = comm.Isend(host.view(_word(arr.dtype.itemsize)), dest=dest, tag=tag)
        return PendingSend(request, owner)

    def _recv_device(self, comm, out, source, tag) -> None:
        host = self.staging.get("p2p", out.nbytes)
        comm.Recv(host.view(_word(out.dtype.itemsize)), source=source, tag=tag)
        self.ops.h2d(host, out)
        # The staging buffer is reused by the next receive, which MPI writes from the host.
        self.ops.synchronize()

    def free(self) -> None:
        self.staging.free()
        for staging in self.exchange_staging:
            staging.free()
        self.exchange_staging.clear()
        self._free_staging.clear()
        super().free()


class NcclPending:
    """A send enqueued on the stream: done once the stream has passed it."""

    def __init__(self, ops: DeviceOps, buffer):
        self.ops, self.buffer = ops, buffer

    def Wait(self) -> None:
        self.ops.synchronize()
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
    """``nccl``: CuPy's NCCL, one communicator per MPI communicator, on the compute stream.

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
        self._side = None
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

    def _alltoallv_device(self, comm, send, send_counts, recv_counts):
        width, dtype = send.shape[1], send.dtype
        row_bytes = width * dtype.itemsize
        recv = self.ops.empty((int(recv_counts.sum()), width), dtype)
        send_starts, recv_starts = displacements(send_counts), displacements(recv_counts)
        me, peers = comm.Get_rank(), comm.Get_size()
        # Rows kept on this rank: a device copy, not a message to oneself.
        if send_counts[me]:
            s0, r0, n = int(send_starts[me]), int(recv_starts[me]), int(send_counts[me])
            self.ops.copy(send[s0:s0 + n], recv[r0:r0 + n])
        if peers == 1:
            return recv
        nccl_comm = self.communicator(comm)
        stream = self.ops.stream_ptr()
        send_ptr, recv_ptr = self.ops.ptr(send), self.ops.ptr(recv)
        # Byte counts are size_t in NCCL: no int32 limit on a peer's share.
        self.nccl.groupStart()
        try:
            for peer in range(peers):
                if peer == me:
                    continue
                if send_counts[peer]:
                    nccl_comm.send(send_ptr + int(send_starts[peer]) * row_bytes,
                                   int(send_counts[peer]) * row_bytes, self.uint8, peer, stream)
                if recv_counts[peer]:
                    nccl_comm.recv(recv_ptr + int(recv_starts[peer]) * row_bytes,
                                   int(recv_counts[peer]) * row_bytes, self.uint8, peer, stream)
        finally:
            self.nccl.groupEnd()
        return recv

    def side_stream(self):
        """The stream non-blocking exchanges run on, beside the compute stream."""
        if self._side is None:
            self._side = self.ops.side_stream()
        return self._side

    def _on_side_stream(self, comm, enqueue, result, hold: tuple):
        """Enqueue ``enqueue(nccl_comm, stream_ptr)`` on the side stream once the compute
        stream has produced its inputs; a :class:`NcclExchange` for it."""
        nccl_comm = self.communicator(comm)
        side = self.side_stream()
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

    def _allreduce_device(self, comm, arr):
        assert arr.dtype == np.float32, arr.dtype
        if comm.Get_size() > 1:
            ptr = self.ops.ptr(arr)
            self.communicator(comm).allReduce(ptr, ptr, arr.size, self.float32, self.sum,
                                              self.ops.stream_ptr())
        return arr

    def _isend_device(self, comm, arr, dest, tag):
        self.communicator(comm).send(self.ops.ptr(arr), arr.nbytes, self.uint8, dest,
                                     self.ops.stream_ptr())
        return NcclPending(self.ops, arr)

    def _recv_device(self, comm, out, source, tag) -> None:
        self.communicator(comm).recv(self.ops.ptr(out), out.nbytes, self.uint8, source,
                                     self.ops.stream_ptr())

    def free(self) -> None:
        if self._communicators:
            self.ops.synchronize()
        for nccl_comm in self._communicators.values():
            destroy = getattr(nccl_comm, "destroy", None)
            if destroy is not None:
                destroy()
        self._communicators.clear()
        super().free()


# --- building ----------------------------------------------------------------------------

def make(choice, backend: Backend, world=None, ops: DeviceOps | None = None,
         library: MpiLibrary | None = None, nccl=None):
    """The transport object for ``choice`` (a :class:`~spmd_moe.parallel.transport.TransportChoice`)
    on a device backend. ``ops``, ``library`` and ``nccl`` are for tests."""
    if choice.name == "mpi-cuda":
        return CudaAwareMpiTransport(backend, choice.reason,
                                     library if library is not None else mpi_library(), ops)
    if choice.name == "mpi-host":
        return PinnedHostMpiTransport(backend, choice.reason, ops)
    if choice.name == "nccl":
        if backend.choice.shared_device:
            raise ConfigError("transport", "nccl cannot put several ranks on one GPU (NCCL "
                                           "refuses duplicate devices in a communicator); "
                                           "use mpi-host, or one rank per GPU")
        return NcclTransport(backend, choice.reason, ops, nccl)
    raise ValueError(f"no device transport named {choice.name!r}")


def make_transport(choice, backend: Backend, world=None):
    """The transport object for ``choice`` on any backend: the host transport on NumPy, a
    device transport (:func:`make`) on CuPy. It lives here, above transport.py, so that
    transport.py never imports the device transports back."""
    if not backend.on_gpu:
        return HostMpiTransport(backend, choice.reason)
    return make(choice, backend, world)


def host_view(ptr: int, nbytes: int) -> np.ndarray:
    """uint8 array over host memory at ``ptr`` (for the CPU stand-in of NCCL in tests)."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
