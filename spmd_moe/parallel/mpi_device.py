"""MPI transports for device (CuPy) arrays.

- :class:`CudaAwareMpiTransport` (``mpi-cuda``): drain the compute stream, then hand the
  CuPy arrays to MPI (mpi4py reads ``__cuda_array_interface__``). Built only when the MPI
  library says it is CUDA-aware, and asserted again before every call: a device pointer
  given to an MPI that is not CUDA-aware segfaults (Debian's Open MPI 4.1). Non-blocking
  exchanges are one ``Isend``/``Irecv`` per peer on the device buffers (point-to-point is
  the part of CUDA-awareness every MPI has); the allreduce stays blocking on the device.
- :class:`PinnedHostMpiTransport` (``mpi-host``): rows copied device -> pinned host buffers
  on the compute stream, MPI on the host, received rows copied back asynchronously; the
  buffers are kept and grown. Non-blocking exchanges stage through pinned buffers of their
  own (one set per exchange in flight), ``MPI_Ialltoallv``/``MPI_Iallreduce`` on them,
  copied back in ``Wait``.

A stage's receive (``irecv``) is an ``Irecv`` into the device buffer (mpi-cuda) or into
pinned buffers of its own, copied in ``Wait`` (mpi-host).

Notation: P peers in the communicator, R rows, d words per row.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import Backend
from .device import CupyOps, DeviceOps, PinnedStaging, word_dtype
from .transport import HostMpiTransport, MpiLibrary, PendingExchange, PendingSend, displacements

# mpi-cuda's non-blocking exchanges: tags EXCHANGE_TAG_BASE + (n mod EXCHANGE_TAGS), above
# the engine's pipeline tags and within every MPI's guaranteed tag range (32767).
EXCHANGE_TAG_BASE, EXCHANGE_TAGS = 1000, 16384


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
        comm.Alltoallv([send.view(word_dtype(item)), (send_counts, displacements(send_counts)),
                        rows],
                       [recv.view(word_dtype(item)), (recv_counts, displacements(recv_counts)),
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
                requests.append(comm.Irecv([recv[r0:r0 + n].view(word_dtype(item)), n, rows],
                                           source=peer, tag=tag))
            if send_counts[peer]:
                s0, n = int(send_starts[peer]), int(send_counts[peer])
                requests.append(comm.Isend([send[s0:s0 + n].view(word_dtype(item)), n, rows],
                                           dest=peer, tag=tag))
        return PendingExchange(requests, recv, hold=(send,))

    def _irecv_device(self, comm, out, source, tag):
        self._check()
        # As _recv_device: ``out`` is a fresh pool block that kernels still queued may use;
        # MPI writes it from outside the stream.
        self.ops.synchronize()
        return PendingExchange([comm.Irecv(out.view(word_dtype(out.dtype.itemsize)),
                                           source=source, tag=tag)], out)

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
        return PendingSend(comm.Isend(arr.view(word_dtype(arr.dtype.itemsize)), dest=dest,
                                      tag=tag), arr)

    def _recv_device(self, comm, out, source, tag) -> None:
        self._check()
        # ``out`` is fresh from CuPy's pool, which hands back a block as soon as its last
        # user was freed on the host: kernels still queued on the stream may read it. MPI
        # writes it from outside the stream, so the stream must be drained first.
        self.ops.synchronize()
        comm.Recv(out.view(word_dtype(out.dtype.itemsize)), source=source, tag=tag)


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
        request = comm.Ialltoallv([send_host.view(word_dtype(item)),
                                   (send_counts, displacements(send_counts)), rows],
                                  [recv_host.view(word_dtype(item)),
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
        request = comm.Irecv(host.view(word_dtype(out.dtype.itemsize)), source=source, tag=tag)

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
        comm.Alltoallv([send_host.view(word_dtype(item)),
                        (send_counts, displacements(send_counts)), rows],
                       [recv_host.view(word_dtype(item)),
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
        request = comm.Isend(host.view(word_dtype(arr.dtype.itemsize)), dest=dest, tag=tag)
        return PendingSend(request, owner)

    def _recv_device(self, comm, out, source, tag) -> None:
        host = self.staging.get("p2p", out.nbytes)
        comm.Recv(host.view(word_dtype(out.dtype.itemsize)), source=source, tag=tag)
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
