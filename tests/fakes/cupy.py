"""CuPy's array module on the fake device (device.py): :class:`FakeCupy`, its arrays
(:class:`DeviceArray`), and ``cupy.cuda`` (streams, events, ``runtime.memcpyAsync``, pinned
memory, cuBLAS's ``gemmEx``).

Every operation that CuPy would launch is queued on the current stream instead of done:
a ufunc or NumPy function over device arrays, ``astype`` that converts, ``copy``, ``fill``,
indexing with index arrays (a gather), any assignment, creation that writes (``zeros``,
``arange``, ``asarray`` of host data); the result is a fresh pool allocation whose shape
comes from running the operation on zeros. Views (reshape, transpose, basic slicing) and
``empty`` are free. Reading a device array on the host (``get``, ``float``, ``item``, ...)
synchronises the stream first; a host NumPy array where CuPy wants a device one is a
TypeError, as on CuPy. cupy.matmul of bfloat16 is refused: every bf16 GEMM must go through
the backend's cublasGemmEx (float32 accumulation).
"""
from __future__ import annotations

from types import SimpleNamespace

import ml_dtypes
import numpy as np

from .device import FakeEvent, current, get_elapsed_time, host_view

BF16 = np.dtype(ml_dtypes.bfloat16)

# NumPy functions whose result views their argument's memory (no device work).
VIEWS = {"reshape", "transpose", "swapaxes", "moveaxis", "squeeze", "expand_dims",
         "broadcast_to", "broadcast_arrays", "atleast_1d", "atleast_2d", "atleast_3d",
         "split", "array_split", "hsplit", "vsplit", "dsplit", "real", "imag"}
# Functions of metadata only.
METADATA = {"shape", "ndim", "size", "result_type", "may_share_memory", "shares_memory",
            "iscomplexobj", "isrealobj", "can_cast", "min_scalar_type", "ndim"}
# Functions whose result's shape depends on the data: CuPy synchronises to size it.
DATA_DEPENDENT = {"nonzero", "flatnonzero", "argwhere", "unique", "extract", "compress",
                  "bincount"}
# Creation from host values (no device input): computed on the host, uploaded by one op.
CREATION = {"zeros", "ones", "full", "arange", "linspace", "eye", "identity", "tri"}


def _leaves(obj):
    """The arrays in (possibly nested) arguments."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _leaves(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _leaves(item)


def _map(obj, fn):
    if isinstance(obj, np.ndarray):
        return fn(obj)
    if isinstance(obj, list):
        return [_map(item, fn) for item in obj]
    if isinstance(obj, tuple):
        return tuple(_map(item, fn) for item in obj)
    if isinstance(obj, dict):
        return {key: _map(item, fn) for key, item in obj.items()}
    return obj


def _zeros(arr: np.ndarray) -> np.ndarray:
    return np.zeros(arr.shape, arr.dtype)


def _refuse_host_arrays(name: str, args, kwargs) -> None:
    for leaf in _leaves((args, kwargs)):
        if not isinstance(leaf, DeviceArray) and leaf.ndim >= 1:
            raise TypeError(f"fake cupy: {name} got a host numpy array of shape {leaf.shape} "
                            "(CuPy takes device arrays: bk.asarray it first)")


def _advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (np.ndarray, list)) for i in items)


def _boolean(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, np.ndarray) and i.dtype == bool for i in items)


def empty(shape, dtype=np.float32, order="C") -> "DeviceArray":
    """A fresh pool allocation (not written: whatever the chunk last held)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(int(n) for n in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    owner = current().allocate(max(nbytes, 1))
    arr = owner[:nbytes].view(dtype).reshape(shape, order=order).view(DeviceArray)
    arr._owner = owner
    return arr


def upload(values: np.ndarray, name: str = "host->device") -> "DeviceArray":
    """A device copy of host ``values``, taken now (CuPy stages pageable memory)."""
    values = np.array(values, copy=True, order="C")
    out = empty(values.shape, values.dtype)
    raw = current().raw(out)

    def run():
        raw[...] = values

    current().enqueue(name, run, writes=[out])
    return out


def lazy(name: str, func, args=(), kwargs=None, out=None):
    """``func(*args, **kwargs)`` queued on the current stream, into fresh device arrays (or
    ``out``: a tuple of device arrays written in place)."""
    kwargs = kwargs or {}
    device = current()
    _refuse_host_arrays(name, args, kwargs)
    if out is None:
        with np.errstate(all="ignore"):
            probe = func(*_map(args, _zeros), **_map(kwargs, _zeros))
        multiple = isinstance(probe, tuple)
        results = tuple(empty(np.shape(p), np.asarray(p).dtype)
                        for p in (probe if multiple else (probe,)))
    else:
        multiple, results = len(out) > 1, out
    raw_args, raw_kwargs = _map(args, device.raw), _map(kwargs, device.raw)
    raw_out = tuple(device.raw(r) for r in results)
    in_place = out is not None

    def run():
        if in_place:
            func(*raw_args, **raw_kwargs, out=raw_out if multiple else raw_out[0])
            return
        value = func(*raw_args, **raw_kwargs)
        for target, part in zip(raw_out, value if multiple else (value,)):
            target[...] = part

    device.enqueue(name, run, reads=list(_leaves((args, kwargs))), writes=list(results))
    return results if multiple else results[0]


def data_dependent(name: str, func, args=(), kwargs=None):
    """A result sized by the data: the stream is synchronised (as CuPy does), the result
    computed from what the device holds and written back by one queued op."""
    kwargs = kwargs or {}
    device = current()
    device.synchronize_stream(device.current_stream)
    value = func(*_map(args, device.raw), **_map(kwargs, device.raw))
    if isinstance(value, tuple):
        return tuple(upload(np.asarray(v), name) for v in value)
    return upload(np.asarray(value), name)


class Pointer(SimpleNamespace):
    """``arr.data``: its device address."""


class DeviceArray(np.ndarray):
    """An array in the fake device's memory (CuPy's ``ndarray``). ``_owner`` keeps its pool
    chunk allocated; operations on it are queued (module docstring)."""

    __array_priority__ = 100.0

    def __array_finalize__(self, obj):
        self._owner = getattr(obj, "_owner", None)

    @property
    def data(self) -> Pointer:
        return Pointer(ptr=self.__array_interface__["data"][0])

    # --- host reads: synchronise first ------------------------------------------------

    def get(self, stream=None, order="C", out=None) -> np.ndarray:
        """Copy to the host: one device->host copy, then the stream synchronised."""
        device = current()
        host = np.empty(self.shape, self.dtype)
        raw = device.raw(self)

        def run():
            host[...] = raw

        device.enqueue("device->host", run, reads=[self])
        device.wait_for(lambda: not (stream or device.current_stream).queue, "stream",
                        bias=stream or device.current_stream)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr: np.ndarray, stream=None) -> None:
        """Copy host ``arr`` in (taken now, queued on the stream)."""
        device = current()
        values, raw = np.array(arr, dtype=self.dtype).reshape(self.shape), device.raw(self)

        def run():
            raw[...] = values

        device.enqueue("host->device", run, writes=[self], stream=stream)

    def _host(self) -> np.ndarray:
        device = current()
        device.wait_for(lambda: not device.current_stream.queue, "read",
                        bias=device.current_stream)
        return device.raw(self)

    def item(self, *args):
        return self._host().item(*args)

    def tolist(self):
        return self._host().tolist()

    def tobytes(self, order="C"):
        return self._host().tobytes(order)

    def __float__(self):
        return float(self._host())

    def __int__(self):
        return int(self._host())

    def __index__(self):
        return int(self._host())

    def __bool__(self):
        return bool(self._host())

    def __repr__(self):
        return f"DeviceArray({self._host()!r})"

    __str__ = __repr__

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # --- operations: queued ---------------------------------------------------------------

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if ufunc is np.matmul and any(getattr(x, "dtype", None) == BF16 for x in inputs):
            raise TypeError("fake cupy: cupy.matmul of bfloat16 (every bf16 GEMM goes through "
                            "the backend's cublasGemmEx with float32 accumulation)")
        name = f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__
        fn = getattr(ufunc, method)
        if method == "at":
            device = current()
            raw = _map(inputs, device.raw)
            _refuse_host_arrays(name, inputs, kwargs)
            device.enqueue(name, lambda: fn(*raw, **kwargs), reads=list(_leaves(inputs)),
                           writes=[inputs[0]])
            return None
        if out is not None:
            for target in out:
                if not isinstance(target, DeviceArray):
                    raise TypeError(f"fake cupy: {name} into a host array")
            lazy(name, fn, inputs, kwargs, out=out)
            return out[0] if len(out) == 1 else out
        return lazy(name, fn, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        name = func.__name__
        if name in VIEWS or name in METADATA:
            result = func._implementation(*args, **kwargs)
            return _as_device(result, self)
        if name == "empty_like":
            proto = args[0]
            return empty(kwargs.get("shape") or proto.shape, kwargs.get("dtype") or proto.dtype)
        if name in ("zeros_like", "ones_like", "full_like"):
            proto = args[0]
            fill = {"zeros_like": 0, "ones_like": 1}.get(name, args[1] if len(args) > 1
                                                          else kwargs.get("fill_value"))
            out = empty(kwargs.get("shape") or proto.shape, kwargs.get("dtype") or proto.dtype)
            out.fill(fill)
            return out
        if name in ("ascontiguousarray", "asarray", "asanyarray"):
            arr, dtype = args[0], kwargs.get("dtype", args[1] if len(args) > 1 else None)
            if isinstance(arr, DeviceArray):
                same = dtype is None or np.dtype(dtype) == arr.dtype
                if same and (name != "ascontiguousarray" or arr.flags.c_contiguous):
                    return arr
                return lazy("copy", lambda a: np.ascontiguousarray(a, dtype=dtype), (arr,))
        if name == "copyto":
            dst, src = args[0], args[1]
            device = current()
            raw_dst, raw_src = device.raw(dst), _map(src, device.raw)
            device.enqueue("copyto", lambda: np.copyto(raw_dst, raw_src),
                           reads=list(_leaves(src)), writes=[dst])
            return None
        if name in DATA_DEPENDENT:
            return data_dependent(name, func, args, kwargs)
        if name == "concatenate":
            # CuPy copies each array into place: one op each.
            arrays = list(args[0])
            out = lazy(name, func, args, kwargs)
            for _ in arrays[1:]:
                current()._tell("launched", "work", "concatenate part")
            return out
        return lazy(name, func, args, kwargs)

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        return lazy("astype", lambda a: a.astype(dtype, order=order, casting=casting), (self,))

    def copy(self, order="C"):
        return lazy("copy", lambda a: a.copy(order), (self,))

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    def fill(self, value) -> None:
        device = current()
        raw = device.raw(self)

        def run():
            raw.fill(value)

        device.enqueue("fill", run, writes=[self])

    def mean(self, *args, **kwargs):
        return lazy("mean", lambda a: np.ndarray.mean(a, *args, **kwargs), (self,))

    def argmax(self, *args, **kwargs):
        return lazy("argmax", lambda a: np.ndarray.argmax(a, *args, **kwargs), (self,))

    def argmin(self, *args, **kwargs):
        return lazy("argmin", lambda a: np.ndarray.argmin(a, *args, **kwargs), (self,))

    def argsort(self, *args, **kwargs):
        return lazy("argsort", lambda a: np.ndarray.argsort(a, *args, **kwargs), (self,))

    def dot(self, other, out=None):
        return lazy("dot", np.dot, (self, other))

    def trace(self, *args, **kwargs):
        return lazy("trace", lambda a: np.asarray(np.trace(a, *args, **kwargs)), (self,))

    def take(self, indices, axis=None):
        return lazy("take", np.take, (self, indices), {"axis": axis})

    def repeat(self, repeats, axis=None):
        return lazy("repeat", np.repeat, (self, repeats), {"axis": axis})

    def sort(self, axis=-1, kind=None, order=None) -> None:
        device = current()
        raw = device.raw(self)
        device.enqueue("sort", lambda: raw.sort(axis=axis, kind=kind), writes=[self])

    def nonzero(self):
        return data_dependent("nonzero", np.nonzero, (self,))

    def reshape(self, *shape, order="C"):
        shape = shape[0] if len(shape) == 1 and not np.isscalar(shape[0]) else shape
        try:
            return np.ndarray.reshape(self, shape, order=order, copy=False)
        except ValueError:                     # a view cannot do it: CuPy copies
            return lazy("copy", lambda a: np.ndarray.reshape(a, shape, order=order), (self,))

    def ravel(self, order="C"):
        if self.flags.c_contiguous and order in ("C", "K", "A"):
            return self.reshape(-1)
        return lazy("copy", lambda a: np.ndarray.ravel(a, order), (self,))

    def flatten(self, order="C"):
        return lazy("copy", lambda a: np.ndarray.flatten(a, order), (self,))

    def __getitem__(self, index):
        if _advanced(index):
            if _boolean(index):
                return data_dependent("boolean index", lambda a, i: a[i], (self, index))
            return lazy("gather", lambda a, i: a[i], (self, _as_tuple(index)))
        result = super().__getitem__(index)
        if not isinstance(result, np.ndarray):                   # a 0-d view, as on CuPy
            result = super().__getitem__(_as_tuple(index) + (Ellipsis,))
        return result

    def __setitem__(self, index, value):
        device = current()
        if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
            value = np.array(value)                # host data taken now
            raw_value, reads = value, []
        else:
            raw_value, reads = device.raw(value), list(_leaves(value))
        raw, raw_index = device.raw(self), _map(_as_tuple(index), device.raw)

        def run():
            raw[raw_index] = raw_value

        device.enqueue("scatter" if _advanced(index) else "assign", run,
                       reads=reads + list(_leaves(index)), writes=[self])


def _as_tuple(index):
    return index if isinstance(index, tuple) else (index,)


def _as_device(result, like: DeviceArray):
    """Views of device memory as DeviceArrays holding ``like``'s chunk."""
    if isinstance(result, np.ndarray) and not isinstance(result, DeviceArray):
        if current().is_device_memory(result.__array_interface__["data"][0]):
            result = result.view(DeviceArray)
            result._owner = like._owner
        return result
    if isinstance(result, (list, tuple)):
        return type(result)(_as_device(r, like) for r in result)
    return result


# --- cupy.cuda ------------------------------------------------------------------------------

MEMCPY_H2D, MEMCPY_D2H, MEMCPY_D2D, MEMCPY_DEFAULT = 1, 2, 3, 4


class FakeRuntime:
    """``cupy.cuda.runtime``: asynchronous copies by address, device facts."""

    memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice, memcpyDefault = (
        MEMCPY_H2D, MEMCPY_D2H, MEMCPY_D2D, MEMCPY_DEFAULT)

    def __init__(self, device):
        self.device = device

    def _memory(self, address: int, nbytes: int) -> tuple[np.ndarray, bool]:
        """(uint8 view at ``address``, whether the fake device or its pinned pool owns it)."""
        segment = self.device.segment_of(address)
        if segment is None:
            return host_view(address, nbytes), False
        offset = address - segment.ctypes.data
        return segment[offset:offset + nbytes], True

    def memcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        device = self.device
        stream = device.stream_of(stream)
        dst_view, dst_ours = self._memory(dst, nbytes)
        src_view, src_ours = self._memory(src, nbytes)
        if kind == MEMCPY_DEFAULT:                   # unified addressing: by who owns what
            kind = (MEMCPY_D2D if device.is_device_memory(dst) and device.is_device_memory(src)
                    else MEMCPY_D2H if device.is_device_memory(src) else MEMCPY_H2D)
        if kind == MEMCPY_H2D and not src_ours:
            src_view = src_view.copy()             # pageable: staged by CUDA at the call
        name = {MEMCPY_H2D: "host->device", MEMCPY_D2H: "device->host",
                MEMCPY_D2D: "device->device"}[kind]

        def run():
            dst_view[...] = src_view

        device.enqueue(name, run, reads=[(src, src + nbytes)] if src_ours else [],
                       writes=[(dst, dst + nbytes)] if dst_ours else [], stream=stream)
        if kind == MEMCPY_D2H and not dst_ours:
            # Into pageable memory CUDA returns only once the copy is done.
            device.wait_for(lambda: not stream.queue, "stream", bias=stream)

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        """cudaMemcpy: on the legacy default stream, the host waiting for it."""
        self.memcpyAsync(dst, src, nbytes, kind, 0)
        stream = self.device.null_stream
        self.device.wait_for(lambda: not stream.queue, "stream", bias=stream)

    def deviceSynchronize(self) -> None:
        self.device.synchronize()

    def streamSynchronize(self, stream: int) -> None:
        self.device.synchronize_stream(self.device.stream_of(stream))

    def getDeviceCount(self) -> int:
        return 1

    def getDeviceProperties(self, index: int) -> dict:
        return {"name": self.device.name.encode(), "major": 9, "minor": 0}

    def memGetInfo(self) -> tuple[int, int]:
        return 64 << 30, 80 << 30


class FakeCublas:
    """``cupy.cuda.cublas``: gemmEx (column-major, host pointer mode) queued on the current
    stream, float32 accumulation; the scalars read at the call."""

    types = {0: np.dtype(np.float32), 14: BF16}

    def __init__(self, device):
        self.device = device
        self.mode = 1
        self.calls: list[tuple] = []          # (m, n, k, A type, B type, C type) per call

    def getPointerMode(self, handle):
        return self.mode

    def setPointerMode(self, handle, mode):
        self.mode = mode

    def _matrix(self, address, code, rows, cols, ld):
        dtype = self.types[code]
        nbytes = ((cols - 1) * ld + rows) * dtype.itemsize if rows and cols else 0
        segment = self.device.segment_of(address)
        assert segment is not None, "cuBLAS operand not in device memory"
        offset = address - segment.ctypes.data
        flat = segment[offset:offset + max(nbytes, 0)].view(dtype)
        matrix = np.lib.stride_tricks.as_strided(flat, (rows, cols),
                                                 (dtype.itemsize, ld * dtype.itemsize))
        return matrix, (address, address + nbytes)

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, a, atype, lda, b, btype, ldb,
               beta, c, ctype, ldc, compute, algo):
        assert self.mode == 0 and transa == transb == 0, "host pointer mode, no transposes"
        assert compute == 68 and algo == -1, "CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT"
        self.calls.append((m, n, k, atype, btype, ctype))
        one = float(host_view(alpha, 4).view(np.float32)[0])
        zero = float(host_view(beta, 4).view(np.float32)[0])
        left, left_range = self._matrix(a, atype, m, k, lda)
        right, right_range = self._matrix(b, btype, k, n, ldb)
        out, out_range = self._matrix(c, ctype, m, n, ldc)
        out_dtype = self.types[ctype]

        def run():
            product = left.astype(np.float32) @ right.astype(np.float32)
            if zero:
                product = product * np.float32(one) + np.float32(zero) * out.astype(np.float32)
            elif one != 1.0:
                product = product * np.float32(one)
            out[...] = product.astype(out_dtype)

        self.device.enqueue("cublasGemmEx", run, reads=[left_range, right_range],
                            writes=[out_range])


class FakeDeviceHandle:
    """``cupy.cuda.Device(i)``."""

    compute_capability = "90"
    attributes = {"MultiProcessorCount": 132, "MaxSharedMemoryPerBlockOptin": 227 << 10}

    def __init__(self, device, index: int = 0):
        self.device, self.id = device, index

    def use(self) -> None:
        pass

    def synchronize(self) -> None:
        self.device.synchronize()


class FakeCuda:
    """``cupy.cuda`` on the fake device."""

    def __init__(self, device):
        self._device = device
        self.runtime = FakeRuntime(device)
        self.cublas = FakeCublas(device)
        self.device = SimpleNamespace(get_cublas_handle=lambda: 1)
        self.Event = FakeEvent
        self.get_elapsed_time = get_elapsed_time

    def Stream(self, null: bool = False, non_blocking: bool = False, ptds: bool = False):
        """A new stream; ``null``: the legacy default stream itself."""
        if null:
            return self._device.null_stream
        return self._device.new_stream(non_blocking=non_blocking)

    def get_current_stream(self):
        return self._device.current_stream

    def Device(self, index: int | None = None) -> FakeDeviceHandle:
        return FakeDeviceHandle(self._device, index or 0)

    def alloc_pinned_memory(self, nbytes: int) -> np.ndarray:
        """Page-locked memory from the fake pinned pool (an array: its buffer is the
        memory; keep it alive while copies use it)."""
        return self._device.allocate_pinned(nbytes)


class FakeRandom:
    """``cupy.random.default_rng(seed)``: drawn on the host, uploaded."""

    def __init__(self, seed=None):
        self.rng = np.random.default_rng(seed)

    def standard_normal(self, size=None, dtype=np.float64):
        return upload(self.rng.standard_normal(size, dtype=dtype), "random")

    def random(self, size=None, dtype=np.float64):
        return upload(self.rng.random(size, dtype=dtype), "random")

    def integers(self, low, high=None, size=None, dtype=np.int64):
        return upload(self.rng.integers(low, high, size, dtype=dtype), "random")


class FakeCupy:
    """The ``cupy`` module on a fake device (module docstring)."""

    ndarray = DeviceArray

    def __init__(self, device=None):
        device = device or current()
        self.device = device
        self.cuda = FakeCuda(device)
        self.random = SimpleNamespace(default_rng=FakeRandom)
        self.__version__ = "fake"

    def empty(self, shape, dtype=np.float32, order="C"):
        return empty(shape, dtype, order)

    def empty_like(self, a, dtype=None, shape=None):
        return empty(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)

    def asarray(self, a, dtype=None, order=None):
        if isinstance(a, DeviceArray):
            return a if dtype is None else a.astype(dtype, copy=False)
        return upload(np.asarray(a, dtype=dtype))

    def array(self, a, dtype=None, copy=True):
        if isinstance(a, DeviceArray):
            return a.astype(a.dtype if dtype is None else dtype, copy=copy)
        return upload(np.asarray(a, dtype=dtype))

    def ascontiguousarray(self, a, dtype=None):
        if isinstance(a, DeviceArray):
            if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
                return a
            return lazy("copy", lambda x: np.ascontiguousarray(x, dtype=dtype), (a,))
        return upload(np.ascontiguousarray(a, dtype=dtype))

    def asnumpy(self, a):
        return a.get() if isinstance(a, DeviceArray) else np.asarray(a)

    def matmul(self, a, b, out=None):
        if a.dtype == BF16 or b.dtype == BF16:
            raise TypeError("fake cupy: cupy.matmul of bfloat16 (every bf16 GEMM goes through "
                            "the backend's cublasGemmEx with float32 accumulation)")
        return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)

    def get_default_memory_pool(self):
        return self.device.memory

    def get_default_pinned_memory_pool(self):
        return self.device.pinned

    def __getattr__(self, name):
        value = getattr(np, name)
        if isinstance(value, type) or not callable(value):
            return value

        def call(*args, **kwargs):
            if any(isinstance(leaf, DeviceArray) for leaf in _leaves((args, kwargs))):
                return value(*args, **kwargs)
            if name in CREATION:
                return upload(value(*args, **kwargs), name)
            raise TypeError(f"fake cupy: cupy.{name} without a device array")
        return call
