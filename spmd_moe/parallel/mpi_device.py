"""MPI transports for device (CuPy) arrays.

- :class:`CudaAwareMpiTransport` (``mpi-cuda``): the host waits for the work a buffer
  depends on (DeviceOps.fence), then hands the CuPy arrays to MPI (mpi4py reads
  ``__cuda_array_interface__``). Built only when the MPI library says it is CUDA-aware,
  and asserted again before every call: a device pointer given to an MPI that is not
  CUDA-aware segfaults (Debian's Open MPI 4.1). Exchanges are one ``Isend``/``Irecv`` per
  peer on the device buffers (point-to-point is the part of CUDA-awareness every MPI has);
  the allreduce stays blocking on the device (Open MPI's non-blocking collectives copy and
  reduce on the host, which a device pointer would crash).
- :class:`PinnedHostMpiTransport` (``mpi-host``): rows copied device -> pinned host buffers
  on the compute stream, MPI on the host, received rows copied back asynchronously in
  ``Wait``; each exchange in flight stages through a set of pinned buffers of its own,
  kept and grown.

A stage's receive (``irecv``) is an ``Irecv`` into the device buffer (mpi-cuda) or into
pinned buffers of its own, copied in ``Wait`` (mpi-host). Host arrays (token ids) take
the host path on every transport. Each exchange costs the host one event wait (a fence:
MPI reads and writes memory outside the stream); none synchronises the device.

Notation: P peers in the communicator, R rows, d words per row.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import Backend
from .device import CupyOps, DeviceOps, PinnedStaging, word_dtype
from .transport import HostMpiTransport, MpiLibrary, PendingExchange, PendingSend, displacements

# mpi-cuda's exchanges: tags EXCHANGE_TAG_BASE + (n mod EXCHANGE_TAGS), above the engine's
# pipeline tags and within every MPI's guaranteed tag range (32767).
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

    def ialltoallv(self, comm, send, send_counts: np.ndarray, recv_counts: np.ndarray):
        """send: [R, d] rows grouped by destination peer (device), counts host int64 [P]
        in rows. Starts the exchange; ``Wait()`` returns [sum(recv_counts), d] grouped by
        source peer (device)."""
        if not self.ops.is_device(send):
            return super().ialltoallv(comm, send, send_counts, recv_counts)
        assert send.ndim == 2 and int(send_counts.sum()) == send.shape[0], (
            send.shape, send_counts)
        return self._ialltoallv_device(comm, self.ops.contiguous(send),
                                       np.asarray(send_counts, dtype=np.int64),
                                       np.asarray(recv_counts, dtype=np.int64))

    def iallreduce_sum(self, comm, arr):
        """Start the in-place sum over ranks of a float32 array (device or host);
        ``Wait()`` returns ``arr``, summed."""
        if not self.ops.is_device(arr):
            return super().iallreduce_sum(comm, arr)
        assert arr.flags.c_contiguous, "allreduce works in place on contiguous arrays"
        return self._iallreduce_device(comm, arr)

    def isend(self, comm, arr, dest: int, tag: int):
        """Start sending ``arr`` (device or host); ``Wait()`` on the result ends it."""
        if not self.ops.is_device(arr):
            return super().isend(comm, arr, dest, tag)
        return self._isend_device(comm, self.ops.contiguous(arr), dest, tag)

    def irecv(self, comm, shape: tuple[int, ...], dtype: np.dtype, source: int, tag: int,
              host: bool | None = None):
        """Start receiving an array of ``shape``: on the host for integer and bool dtypes
        (token ids), on the device for float dtypes, unless ``host`` says otherwise;
        ``Wait()`` returns it."""
        if self._recv_on_host(dtype, host):
            return super().irecv(comm, shape, dtype, source, tag)
        out = self.ops.empty(tuple(shape), np.dtype(dtype))
        return self._irecv_device(comm, out, source, tag)

    # Subclasses implement these on device arrays.
    def _ialltoallv_device(self, comm, send, send_counts, recv_counts): ...
    def _iallreduce_device(self, comm, arr): ...
    def _isend_device(self, comm, arr, dest, tag): ...
    def _irecv_device(self, comm, out, source, tag): ...


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
        # MPI reads ``send`` and writes ``recv`` (a fresh pool block, whose last user's
        # kernels may still be queued) outside the stream.
        self.ops.fence()
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
        # ``out`` is fresh from CuPy's pool, which hands back a block as soon as its last
        # user was freed on the host: kernels still queued may use it, and MPI writes it
        # from outside the stream.
        self.ops.fence()
        return PendingExchange([comm.Irecv(out.view(word_dtype(out.dtype.itemsize)),
                                           source=source, tag=tag)], out)

    def _exchange_tag(self, comm) -> int:
        key = comm.py2f()
        self._tags[key] = (self._tags.get(key, -1) + 1) % EXCHANGE_TAGS
        return EXCHANGE_TAG_BASE + self._tags[key]

    def _iallreduce_device(self, comm, arr):
        """Blocking on the device (module docstring), returned as a completed request."""
        from mpi4py import MPI

        self._check()
        self.ops.fence()
        comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        return PendingExchange([], arr)

    def _isend_device(self, comm, arr, dest, tag):
        self._check()
        self.ops.fence()
        return PendingSend(comm.Isend(arr.view(word_dtype(arr.dtype.itemsize)), dest=dest,
                                      tag=tag), arr)


class PinnedHostMpiTransport(DeviceTransport):
    """``mpi-host``: device rows staged through reused pinned host buffers."""

    name = "mpi-host"

    def __init__(self, backend: Backend, reason: str = "", ops: DeviceOps | None = None):
        super().__init__(backend, reason, ops)
        # Staging for exchanges in flight: a set of buffers each, back to the pool on Wait.
        self.exchange_staging: list[PinnedStaging] = []
        self._free_staging: list[PinnedStaging] = []

    def _take_staging(self) -> PinnedStaging:
        if not self._free_staging:
            self.exchange_staging.append(PinnedStaging(self.ops))
            return self.exchange_staging[-1]
        return self._free_staging.pop()

    def _staged(self, request, staging: PinnedStaging, host: np.ndarray, shape, dtype,
                out=None) -> PendingExchange:
        """``request`` fills ``host``; ``Wait`` copies it to ``out`` (or a new device array
        of ``shape``) on the compute stream and hands the staging set back."""
        def finish(_):
            result = out if out is not None else self.ops.empty(shape, dtype)
            self.ops.h2d(host, result)       # queued on the compute stream
            self._free_staging.append(staging)
            return result

        return PendingExchange([request], None, finish=finish)

    def _ialltoallv_device(self, comm, send, send_counts, recv_counts):
        width, dtype = send.shape[1], send.dtype
        item = dtype.itemsize
        n_recv = int(recv_counts.sum())
        staging = self._take_staging()
        send_host = staging.get("send", send.nbytes)
        recv_host = staging.get("recv", n_recv * width * item)
        self.ops.d2h(send, send_host)
        # MPI reads the host copy, and writes a buffer whose last host->device copy (an
        # earlier exchange's) may still be queued.
        self.ops.fence()
        rows = self.row_type(item, width)
        request = comm.Ialltoallv([send_host.view(word_dtype(item)),
                                   (send_counts, displacements(send_counts)), rows],
                                  [recv_host.view(word_dtype(item)),
                                   (recv_counts, displacements(recv_counts)), rows])
        return self._staged(request, staging, recv_host, (n_recv, width), dtype)

    def _irecv_device(self, comm, out, source, tag):
        staging = self._take_staging()
        host = staging.get("p2p", out.nbytes)
        self.ops.fence()         # the buffer's last host->device copy may still be queued
        request = comm.Irecv(host.view(word_dtype(out.dtype.itemsize)), source=source, tag=tag)
        return self._staged(request, staging, host, out.shape, out.dtype, out)

    def _iallreduce_device(self, comm, arr):
        from mpi4py import MPI

        staging = self._take_staging()
        host = staging.get("allreduce", arr.nbytes)
        self.ops.d2h(arr, host)
        self.ops.fence()
        request = comm.Iallreduce(MPI.IN_PLACE, host.view(arr.dtype), op=MPI.SUM)
        return self._staged(request, staging, host, arr.shape, arr.dtype, arr)

    def _isend_device(self, comm, arr, dest, tag):
        # A buffer of its own: several sends may be in flight (pipeline micro-batches).
        host, owner = self.ops.pinned(max(1, arr.nbytes))
        host = host[:arr.nbytes]
        self.ops.d2h(arr, host)
        self.ops.fence()
        request = comm.Isend(host.view(word_dtype(arr.dtype.itemsize)), dest=dest, tag=tag)
        return PendingSend(request, owner)

    def free(self) -> None:
        for staging in self.exchange_staging:
            staging.free()
        self.exchange_staging.clear()
        self._free_staging.clear()
        super().free()
