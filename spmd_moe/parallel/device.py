"""Device primitives the device transports use, behind one interface (:class:`DeviceOps`,
:class:`CupyOps` on CuPy): streams, events, copies between device and pinned host memory,
raw pointers, and :meth:`DeviceOps.fence`, the host's one way to wait for the device before
MPI touches device or staging memory. :class:`PinnedStaging` keeps a transport's pinned
buffers. The CPU tests run them on CuPy's array module on a fake device (tests/fakes/)."""
from __future__ import annotations

from typing import Any

import numpy as np


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
    def fence(self) -> None: ...
    def stream_ptr(self, stream=None) -> int: ...
    # Streams and events, for exchanges that run beside the compute stream (NCCL).
    def side_stream(self): ...
    def record_event(self, stream=None): ...
    def wait_event(self, event, stream=None) -> None: ...
    def wait_host(self, event) -> None: ...
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
        """The whole compute stream (transports only when they free their buffers)."""
        self.cp.cuda.get_current_stream().synchronize()

    def fence(self) -> None:
        """Wait on the host for the work queued so far on the compute stream: an event
        recorded now, waited for. Before MPI reads or writes memory outside the stream (a
        send buffer a kernel or copy fills, a fresh pool block whose last user's kernels
        may still be queued, a staging buffer a copy still reads): one event wait per
        exchange, never a device synchronisation."""
        self.wait_host(self.record_event())

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

    def wait_host(self, event) -> None:
        """The host waits for ``event`` (the work queued before it on its stream)."""
        event.synchronize()

    def event_done(self, event) -> bool:
        return bool(event.done)

    def elapsed(self, start, stop) -> float:
        """Seconds between two completed events."""
        stop.synchronize()
        return self.cp.cuda.get_elapsed_time(start, stop) / 1e3


class PinnedStaging:
    """Grow-only pinned host buffers, one per role ("send", "recv", ...).

    Growing drops the old buffer, which an asynchronous copy may still be reading, so the
    host waits for the stream first (a fence); sizes grow by at least 1.5x so that this is
    rare.
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
                self.ops.fence()
            size = max(nbytes, int(1.5 * view.nbytes) if view is not None else 0)
            self.buffers[role] = self.ops.pinned(size)
            view = self.buffers[role][0]
        return view[:nbytes]

    def free(self) -> None:
        if self.buffers:
            self.ops.synchronize()
        self.buffers.clear()


def word_dtype(itemsize: int) -> np.dtype:
    return np.dtype(f"u{itemsize}")
