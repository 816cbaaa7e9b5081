"""A launch counter for the engine on the fake device: what the GPU path costs in array
operations, counted, so that the performance model's GPU op table (``compute.GPU_OPS``) is
checked against the engine rather than guessed (tests/test_launch_count.py).

Each op that on CuPy is one call into the device (a kernel launch, a cuBLAS GEMM, a
host<->device copy) counts one, attributed to the engine phase (PhaseTimer.phase) and
layer it runs in:

- a fused kernel launch (the fake device's FakeKernel), a matmul of the fake CuPy (cuBLAS)
  and its host->device copies;
- on the generic array code: each ufunc call (an elementwise kernel or a reduction), each
  NumPy array function (``xp.mean``, ``xp.where``, ``xp.argmax``...; ``concatenate`` of n
  arrays counts n: CuPy copies each into place), ``astype`` that converts or copies,
  ``copy``, indexing with an index array (a gather), any assignment into an array (a copy
  or scatter kernel), ``arange``/``zeros``/``full``;
- the Backend's own operations as CuPy runs them: ``matmul`` one cublasGemmEx for bf16
  (plus its float32 upcasts otherwise), ``take_rows``/``put_rows`` one gather/scatter,
  ``asarray``/``to_host`` one copy;
- free, as on CuPy: views (reshape, transpose, basic slicing), ``empty``, ``astype`` to
  the same dtype with ``copy=False``, ``ascontiguousarray`` of a contiguous array.

Weights are kept in the storage dtype (as on the GPU; the NumPy backend keeps float32
copies), so that a bf16 run takes the GPU's branches.
"""
from __future__ import annotations

import contextlib
from collections import Counter, defaultdict

import numpy as np
from fakes.kernels import FakeArray, FakeCupy, FakeModule, HostFusedKernels

from spmd_moe.backend.array import F32, Backend, BackendChoice, PhaseTimer

BF16_NAME = "bfloat16"


class LaunchCounter:
    """Ops per (pass, layer, phase). ``pass_index`` counts a stage's passes (a micro-batch
    or a decode step through the stage); ``layer`` is the engine's current layer."""

    def __init__(self):
        self.counts: dict[tuple, Counter] = defaultdict(Counter)
        self.phase: str | None = None
        self.layer: int | None = None
        self.pass_index = -1

    def tick(self, n: int = 1, what: str = "op") -> None:
        if n:
            self.counts[(self.pass_index, self.layer, self.phase)][what] += n

    def ops(self, pass_index: int, layer: int) -> dict[str, int]:
        """Ops per phase of one layer of one pass."""
        return {phase: sum(c.values()) for (p, l, phase), c in self.counts.items()
                if p == pass_index and l == layer and phase is not None}

    def detail(self, pass_index: int, layer: int, phase: str) -> Counter:
        return self.counts[(pass_index, layer, phase)]


COUNTER: LaunchCounter | None = None


def tick(n: int = 1, what: str = "op") -> None:
    if COUNTER is not None:
        COUNTER.tick(n, what)


def _plain(x):
    if isinstance(x, Counted):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def _wrap(x):
    if isinstance(x, np.ndarray) and not isinstance(x, Counted):
        return x.view(Counted)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (np.ndarray, list)) for i in items)


class Counted(np.ndarray):
    """A device array of the counting backend: NumPy doing the work, each operation that
    CuPy would launch counted once (nested NumPy internals are not: inputs are unwrapped
    before the work)."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        tick(1, f"ufunc {ufunc.__name__}.{method}")
        if out is not None:
            kwargs["out"] = _plain(out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        name = func.__name__
        if name in ("reshape", "transpose", "shape", "ndim", "result_type", "may_share_memory",
                    "empty_like", "ravel_multi_index", "copyto"):
            cost = 1 if name == "copyto" else 0
        elif name == "concatenate":
            cost = len(args[0])
        elif name == "ascontiguousarray":
            cost = 0 if args[0].flags.c_contiguous else 1
        else:
            cost = 1
        tick(cost, f"function {name}")
        return _wrap(func(*_plain(args), **_plain(kwargs)))

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        same = np.dtype(dtype) == self.dtype
        tick(0 if same and not copy else 1, "astype")
        return _wrap(self.view(np.ndarray).astype(dtype, order=order, casting=casting,
                                                  copy=copy))

    def copy(self, order="C"):
        tick(1, "copy")
        return _wrap(self.view(np.ndarray).copy(order))

    def mean(self, *args, **kwargs):
        tick(1, "mean")
        return _wrap(self.view(np.ndarray).mean(*args, **kwargs))

    def argmax(self, *args, **kwargs):
        tick(1, "argmax")
        return _wrap(self.view(np.ndarray).argmax(*args, **kwargs))

    def __getitem__(self, index):
        if _advanced(index):
            tick(1, "gather")
        result = self.view(np.ndarray)[_plain(index)]
        return _wrap(result)

    def __setitem__(self, index, value):
        tick(1, "scatter" if _advanced(index) else "assign")
        self.view(np.ndarray)[_plain(index)] = _plain(value)


class CountingXp:
    """``bk.xp``: NumPy's functions; those taking no device array count here (the rest
    count in Counted.__array_function__). ``argsort`` is stable, as the NumPy path's."""

    FREE = ("empty", "empty_like")
    MADE = ("arange", "zeros", "full", "ones", "zeros_like", "full_like")

    def __getattr__(self, name):
        value = getattr(np, name)
        if name in self.FREE:
            return lambda *a, **k: _wrap(value(*_plain(a), **_plain(k)))
        if name in self.MADE:
            def made(*a, **k):
                tick(1, name)
                return _wrap(value(*_plain(a), **_plain(k)))
            return made
        if name == "asarray":
            def asarray(a, dtype=None):
                if not isinstance(a, Counted):
                    tick(1, "host->device")
                    return _wrap(np.array(a, dtype=dtype))
                return a.astype(dtype, copy=False) if dtype is not None else a
            return asarray
        if name == "argsort":
            return lambda a, **k: np.argsort(a, **{**k, "kind": "stable"})
        return value


class CountingFakeCupy(FakeCupy):
    """The fake CuPy inside the fused launch code: matmul is one cuBLAS call, asarray a
    host->device copy (the attention schedule), ascontiguousarray a copy only when it
    copies; ``empty`` free."""

    def matmul(self, a, b, out=None):
        tick(1, "cublas")
        return super().matmul(a, b, out=out)

    def asarray(self, a, dtype=None):
        tick(1, "host->device")
        return super().asarray(a, dtype)

    def ascontiguousarray(self, a, dtype=None):
        copies = not a.flags.c_contiguous or (dtype is not None and np.dtype(dtype) != a.dtype)
        tick(int(copies), "copy")
        return super().ascontiguousarray(a, dtype)


class CountedKernels:
    """The fused kernels' launch code on the fake device, each launch counted, results
    handed back as Counted device arrays."""

    def __init__(self, inner: HostFusedKernels):
        self.inner = inner

    def _launches(self) -> int:
        return sum(kernel.launches for module in (
            self.inner.attention_module, self.inner.ffn_module, self.inner.permute_module,
            self.inner.rowwise_module) for kernel in module.kernels.values())

    def __getattr__(self, name):
        value = getattr(self.inner, name)
        if not callable(value) or name.startswith("_") or name in ("fuses", "describe"):
            return value
        if name in ("without_attention", "fit_rowwise"):
            return lambda *a, **k: _rewrap(value(*a, **k))

        def call(*args, **kwargs):
            before = self._launches()
            result = value(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()})
            tick(self._launches() - before, f"kernel {name}")
            return _wrap(result)
        return call


def _rewrap(inner):
    return CountedKernels(inner) if not isinstance(inner, CountedKernels) else inner


class CountingTimer(PhaseTimer):
    @contextlib.contextmanager
    def phase(self, name: str, context=None):
        outer = COUNTER.phase if COUNTER is not None else None
        if COUNTER is not None:
            COUNTER.phase = name
        try:
            with super().phase(name, context):
                yield
        finally:
            if COUNTER is not None:
                COUNTER.phase = outer


class CountingBackend(Backend):
    """The NumPy backend dressed as the CuPy one: the fused kernels of the fake device,
    storage-dtype weights, and every device operation counted (module docstring)."""

    def __init__(self, choice: BackendChoice, dtype: str):
        super().__init__(BackendChoice("numpy", "launch count"), dtype)
        self.xp = CountingXp()
        self.kernels = CountedKernels(HostFusedKernels(CountingFakeCupy(), "90", n_sm=1,
                                                       shared_limit=227 << 10,
                                                       load=FakeModule))
        self.kernels_reason = self.kernels.describe()

    def asarray(self, host, dtype=None):
        tick(1, "host->device")
        arr = _wrap(np.array(_plain(host)))
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def to_host(self, arr) -> np.ndarray:
        if isinstance(arr, Counted):
            tick(1, "device->host")
        return np.array(_plain(arr))

    def param(self, host: np.ndarray):
        # The storage dtype, as on the GPU (a checkpoint's float32 widening of bf16 values
        # rounds back exactly).
        return _wrap(np.ascontiguousarray(host, dtype=self.dtype))

    def take_rows(self, x, index):
        tick(1, "gather")
        return _wrap(_plain(x)[_plain(index)])

    def put_rows(self, out, index, rows) -> None:
        tick(1, "scatter")
        _plain(out)[_plain(index)] = _plain(rows)

    def matmul(self, a, b, out_dtype=None):
        out_dtype = self.dtype if out_dtype is None else np.dtype(out_dtype)
        a, b = _plain(a), _plain(b)
        if not (b.ndim == 2 and a.dtype == b.dtype and a.dtype.name == BF16_NAME
                and out_dtype in (a.dtype, F32)):
            # CuPy's float32 route: upcasts that copy, the GEMM, the output's cast.
            tick(int(a.dtype != F32) + int(b.dtype != F32) + int(out_dtype != F32),
                 "matmul casts")
        tick(1, "cublas")
        result = np.matmul(a.astype(F32), b.astype(F32)).astype(out_dtype)
        return _wrap(result)

    def timer(self) -> PhaseTimer:
        return CountingTimer(self)


@contextlib.contextmanager
def counting(monkeypatch):
    """Run the engine (runner.Backend) on the counting backend; yields the counter. Passes
    and layers are marked at Engine._at_layer."""
    global COUNTER
    from spmd_moe.engine import engine, runner

    counter = LaunchCounter()
    at_layer = engine.Engine._at_layer

    def marked(self, layer, timer):
        if layer == self.topo.layers.start:
            counter.pass_index += 1
        counter.layer = layer
        return at_layer(self, layer, timer)

    monkeypatch.setattr(runner, "Backend", CountingBackend)
    monkeypatch.setattr(engine.Engine, "_at_layer", marked)
    COUNTER = counter
    try:
        yield counter
    finally:
        COUNTER = None


__all__ = ["Counted", "CountingBackend", "FakeArray", "LaunchCounter", "counting"]
