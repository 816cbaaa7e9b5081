"""The array backend, chosen once: CuPy on a usable GPU, NumPy otherwise.

Model code takes a :class:`Backend` and calls ``bk.xp`` functions plus the few operations
whose best form differs between the two (``matmul``, ``gelu``, host/device moves, timers).

Precision contract (SPEC §1): weights and activations between operations are stored in
``bk.dtype``; matmuls accumulate in float32; norms, softmax, the router and the weighted
expert sum run in float32.

NumPy has no bfloat16 GEMM, so on the NumPy backend weights are kept as float32 arrays that
hold bf16-rounded values (``param``): the same numbers, BLAS speed. Activations are real
bf16 arrays on both backends, so what travels over MPI is 16-bit words.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
BACKENDS = ("auto", "cupy", "numpy")


def storage_dtype(name: str) -> np.dtype:
    return BF16 if name == "bfloat16" else F32


@dataclass
class BackendChoice:
    """Which backend was picked and why (for ``info`` and the report)."""

    name: str
    reason: str
    device_id: int | None = None
    device_name: str | None = None
    device_count: int = 0
    shared_device: bool = False


def probe_cupy() -> tuple[Any, str]:
    """Return ``(cupy module, "")`` if a CUDA device is usable, else ``(None, why not)``."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising on import
        return None, f"cupy not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, insufficient driver, no device
        return None, f"no usable CUDA device ({str(exc).splitlines()[0]})"
    if count < 1:
        return None, "no CUDA device visible"
    return cupy, ""


def choose_backend(requested: str, node_rank: int = 0, node_size: int = 1) -> BackendChoice:
    """Pick the backend. ``auto`` takes CuPy when a device is usable, NumPy otherwise;
    ``cupy`` without a usable device is an error (never a silent fallback)."""
    from .errors import ConfigError

    if requested not in BACKENDS:
        raise ConfigError("backend", f"{requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "numpy":
        return BackendChoice("numpy", "requested (--backend numpy)")
    cupy, why_not = probe_cupy()
    if cupy is None:
        if requested == "cupy":
            raise ConfigError("backend", f"cupy requested but {why_not}")
        return BackendChoice("numpy", f"auto: {why_not}")
    count = cupy.cuda.runtime.getDeviceCount()
    device_id = node_rank % count
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return BackendChoice("cupy", "requested" if requested == "cupy" else "auto: CUDA device usable",
                         device_id=device_id, device_name=name, device_count=count,
                         shared_device=node_size > count)


class Backend:
    """Array module, storage dtype and the operations whose best form is backend specific."""

    def __init__(self, choice: BackendChoice, dtype: str):
        self.choice = choice
        self.name = choice.name
        self.dtype = storage_dtype(dtype)
        self.dtype_name = dtype
        if self.name == "cupy":
            import cupy

            cupy.cuda.Device(choice.device_id).use()
            if choice.shared_device:
                warnings.warn(f"more ranks than GPUs on this node: ranks share device "
                              f"{choice.device_id} (fine for tests, not for measurements)")
            self.xp = cupy
        else:
            self.xp = np
        # Fused GPU kernels (an object with attention, expert_ffn, gather_rows,
        # unpermute_weighted) or None: the generic array code runs instead.
        self.kernels = None
        self.kernels_reason = "NumPy backend: generic array code"
        if self.name == "cupy":
            from . import kernels

            kernels.attach(self)

    # --- placement -------------------------------------------------------------------

    @property
    def on_gpu(self) -> bool:
        return self.name == "cupy"

    def asarray(self, host: np.ndarray, dtype: np.dtype | None = None):
        """Host array -> backend array (a copy on the GPU, a view when possible on NumPy)."""
        arr = self.xp.asarray(host)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def to_host(self, arr) -> np.ndarray:
        return arr.get() if self.on_gpu else np.asarray(arr)

    def param(self, host: np.ndarray):
        """A weight in its compute form: bf16 on the GPU; on NumPy float32 holding the same
        bf16-rounded values (NumPy has no bf16 GEMM)."""
        if self.on_gpu:
            return self.xp.asarray(host)
        return np.ascontiguousarray(host, dtype=F32)

    def store(self, x):
        """Round an intermediate to the storage dtype."""
        return x.astype(self.dtype, copy=False)

    def synchronize(self) -> None:
        if self.on_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    # --- math ------------------------------------------------------------------------

    def matmul(self, a, b, out_dtype: np.dtype | None = None):
        """``a @ b`` with float32 accumulation; the result in the storage dtype unless
        ``out_dtype`` is given (float32 for partial sums that are reduced later)."""
        out_dtype = self.dtype if out_dtype is None else out_dtype
        if self.on_gpu:
            if out_dtype == F32 and a.dtype != F32:
                return self.xp.matmul(a.astype(F32), b.astype(F32))
            return self.xp.matmul(a, b).astype(out_dtype, copy=False)
        return np.matmul(a.astype(F32, copy=False), b.astype(F32, copy=False)).astype(
            out_dtype, copy=False)

    def erfc(self, x):
        """Complementary error function of a float32 array."""
        if self.on_gpu:
            import cupyx.scipy.special

            return cupyx.scipy.special.erfc(x)
        return erfc_numpy(x)

    def gelu(self, x):
        """Exact (erf) GELU of a float32 array, written as ``x/2 * erfc(-x/sqrt 2)`` so that
        large negative inputs do not cancel."""
        return 0.5 * x * self.erfc(x * np.float32(-0.7071067811865476))

    # --- timing ----------------------------------------------------------------------

    def timer(self) -> "PhaseTimer":
        return PhaseTimer(self)


def erfc_numpy(x: np.ndarray) -> np.ndarray:
    """erfc to float32 accuracy (fractional error < 1.2e-7, Numerical Recipes' Chebyshev
    fit), computed in float64 and returned as float32. NumPy itself has no erf."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    ans = t * np.exp(-z * z + poly)
    return np.where(x >= 0, ans, 2.0 - ans).astype(F32)


@dataclass
class PhaseTimer:
    """Per-phase wall time and bytes sent, accumulated over one iteration.

    On the GPU the phases are bracketed by CUDA events on the compute stream (a host clock
    would time kernel launches, not kernels); times are read once, in :meth:`totals`.
    """

    backend: Backend
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    _events: list[tuple[str, Any, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.backend.on_gpu:
            cuda = self.backend.xp.cuda
            start, stop = cuda.Event(), cuda.Event()
            start.record()
            try:
                yield
            finally:
                stop.record()
                self._events.append((name, start, stop))
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add_bytes(self, name: str, count: int) -> None:
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + int(count)

    def count(self, name: str, amount: int) -> None:
        """Count work done (e.g. rows through the experts) for FLOP accounting."""
        self.counters[name] = self.counters.get(name, 0) + int(amount)

    def totals(self) -> dict[str, float]:
        """Seconds per phase (synchronises the device once)."""
        if self._events:
            cuda = self.backend.xp.cuda
            self._events[-1][2].synchronize()
            for name, start, stop in self._events:
                ms = cuda.get_elapsed_time(start, stop)
                self.seconds[name] = self.seconds.get(name, 0.0) + ms / 1e3
            self._events.clear()
        return dict(self.seconds)
