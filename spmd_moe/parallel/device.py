"""Device primitives the device transports use, behind one interface (:class:`DeviceOps`):
streams, events, copies between device and pinned host memory, raw pointers.
:class:`CupyOps` on a GPU; :class:`HostArrayOps` plays the device with host memory, so that
the CPU tests run every transport's MPI logic (offsets, staging, buffer growth and
lifetimes) under ``mpiexec``. :class:`PinnedStaging` keeps a transport's pinned buffers."""
from __future__ import annotations

import ctypes
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


def word_dtype(itemsize: int) -> np.dtype:
    return np.dtype(f"u{itemsize}")


def host_view(ptr: int, nbytes: int) -> np.ndarray:
    """uint8 array over host memory at ``ptr`` (for the CPU stand-in of NCCL in tests)."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
