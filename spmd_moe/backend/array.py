"""The array backend, chosen once: CuPy on a usable GPU, NumPy otherwise.

Model code takes a :class:`Backend` and calls ``bk.xp`` functions plus the few operations
whose best form differs between the two (``matmul``, ``gelu``, host/device moves, timers).

Precision contract (SPEC §1): weights and activations between operations are stored in
``bk.dtype``; matmuls accumulate in float32; norms, softmax, the router and the weighted
expert sum run in float32.

NumPy has no bfloat16 GEMM, so on the NumPy backend weights are kept as float32 arrays that
hold bf16-rounded values (``param``): the same numbers, BLAS speed. Activations are real
bf16 arrays on both backends, so what travels over MPI is 16-bit words.

bfloat16 on CuPy (ml_dtypes' dtype, CuPy 14) is handled here, in one place:

- GEMMs: ``matmul`` sends bf16 operands to one ``cublasGemmEx`` (float32 accumulation) that
  writes bf16 or float32 directly: CuPy's own matmul has no float32 output for bf16 inputs.
  Batched (3-D by 3-D) bf16 products, which CuPy refuses, run on float32 copies.
- Special functions: ``erfc``/``gelu`` compute in float32 (CuPy's erfc has no bf16 loop);
  ``gelu`` is one fused elementwise kernel on the GPU.
- Data movement: ``take_rows``/``put_rows`` gather and scatter 16-bit words, so they do not
  depend on which indexing kernels CuPy instantiates for bf16; ``argmax`` compares in float32.
- :func:`bf16_census` lists, op by op, what the installed CuPy does with bf16 (bin/gpu-check
  prints it), so a gap shows up as a line, not as a crash mid-run.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from ..core.trace import PassCursor
from .host import host_memory, share_blas_threads

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
    node_size: int = 1          # ranks on this node (they share its cores)


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
    from ..core.errors import ConfigError

    if requested not in BACKENDS:
        raise ConfigError("backend", f"{requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "numpy":
        return BackendChoice("numpy", "requested (--backend numpy)", node_size=node_size)
    cupy, why_not = probe_cupy()
    if cupy is None:
        if requested == "cupy":
            raise ConfigError("backend", f"cupy requested but {why_not}")
        return BackendChoice("numpy", f"auto: {why_not}", node_size=node_size)
    count = cupy.cuda.runtime.getDeviceCount()
    device_id = node_rank % count
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return BackendChoice("cupy", "requested" if requested == "cupy" else "auto: CUDA device usable",
                         device_id=device_id, device_name=name, device_count=count,
                         shared_device=node_size > count, node_size=node_size)


# The fused kernels sit above this module (they import its dtypes and cuBLAS GEMM), so they
# register their ``attach(backend)`` here when spmd_moe.backend.kernels is imported (the engine
# imports it) instead of being imported back from here.
_attach_kernels = None


def register_kernels(attach) -> None:
    """Called by spmd_moe.backend.kernels on import: ``attach(backend)`` sets a CuPy backend's
    ``kernels`` and ``kernels_reason``."""
    global _attach_kernels
    _attach_kernels = attach


class Backend:
    """Array module, storage dtype and the operations whose best form is backend specific."""

    def __init__(self, choice: BackendChoice, dtype: str):
        self.choice = choice
        self.name = choice.name
        self.dtype = storage_dtype(dtype)
        self.dtype_name = dtype
        self._gemm: CublasGemm | None = None
        self._gelu_kernel = None
        if self.name == "cupy":
            import cupy

            cupy.cuda.Device(choice.device_id).use()
            if choice.shared_device:
                warnings.warn(f"more ranks than GPUs on this node: ranks share device "
                              f"{choice.device_id} (fine for tests, not for measurements)")
            self.xp = cupy
            self.matmul_path = "cublasGemmEx (bf16 in, float32 accumulate)"
        else:
            self.xp = np
            self.matmul_path = "NumPy float32 BLAS on bf16-rounded values"
            self.matmul_path += f"; {share_blas_threads(choice.node_size)}"
        # Fused GPU kernels (an object with attention, expert_ffn, gather_rows,
        # unpermute_weighted) or None: the generic array code runs instead.
        self.kernels = None
        self.kernels_reason = "NumPy backend: generic array code"
        if self.name == "cupy":
            if _attach_kernels is None:
                self.kernels_reason = ("fused kernels not registered (spmd_moe.backend."
                                       "kernels was not imported): the CuPy backend runs the "
                                       "generic array code")
            else:
                _attach_kernels(self)

    # --- placement -------------------------------------------------------------------

    @property
    def on_gpu(self) -> bool:
        return self.name == "cupy"

    @property
    def stream(self):
        """The compute stream (CuPy's current stream) on the GPU; None on NumPy."""
        return self.xp.cuda.get_current_stream() if self.on_gpu else None

    def asarray(self, host: np.ndarray, dtype: np.dtype | None = None):
        """Host array -> backend array (a copy on the GPU, a view when possible on NumPy)."""
        arr = self.xp.asarray(host)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def to_host(self, arr) -> np.ndarray:
        """Backend (or host) array -> host array; synchronises the device when it copies."""
        if not self.on_gpu or not isinstance(arr, self.xp.ndarray):
            return np.asarray(arr)
        return arr.get()

    def to_host_async(self, arr) -> "HostCopy":
        """Start copying a small contiguous device array to the host without waiting: on
        the GPU an asynchronous copy into pinned memory on the compute stream and an event
        after it; :meth:`HostCopy.wait` waits for that event only (not for the work queued
        since, e.g. the other micro-batch's). On NumPy a copy that is already done."""
        if not self.on_gpu or not isinstance(arr, self.xp.ndarray):
            return HostCopy(np.array(arr))
        cuda = self.xp.cuda
        assert arr.flags.c_contiguous, "to_host_async copies contiguous arrays"
        memory = cuda.alloc_pinned_memory(max(1, arr.nbytes))
        host = np.frombuffer(memory, dtype=arr.dtype, count=arr.size).reshape(arr.shape)
        stream = cuda.get_current_stream()
        if arr.nbytes:
            cuda.runtime.memcpyAsync(host.ctypes.data, arr.data.ptr, arr.nbytes,
                                     cuda.runtime.memcpyDeviceToHost, stream.ptr)
        event = cuda.Event()
        event.record(stream)
        return HostCopy(host, event, memory)

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

    # --- data movement that must not depend on bf16 support --------------------------
    # Gathers and scatters copy bits: on the GPU they run on the 16-bit words, so they
    # work whatever CuPy's indexing kernels support for bfloat16.

    def take_rows(self, x, index):
        """``x[index]`` along axis 0. x: [n, ...]; index: int backend array [m] ->
        [m, ...] in x's dtype."""
        if self.on_gpu and x.dtype.itemsize == 2 and x.dtype != np.float16:
            return x.view(np.uint16)[index].view(x.dtype)
        return x[index]

    def put_rows(self, out, index, rows) -> None:
        """``out[index] = rows`` along axis 0 (rows in out's dtype)."""
        if self.on_gpu and out.dtype.itemsize == 2 and out.dtype != np.float16:
            assert rows.dtype == out.dtype, (rows.dtype, out.dtype)
            out.view(np.uint16)[index] = rows.view(np.uint16)
        else:
            out[index] = rows

    def argmax(self, x, axis: int = -1):
        """First index of the maximum (ties: lowest index) as int64; bf16 is compared in
        float32 (exact: every bf16 is a float32)."""
        if x.dtype not in (F32, np.dtype(np.float64)):
            x = x.astype(F32)
        return self.xp.argmax(x, axis=axis)

    # --- math ------------------------------------------------------------------------

    def matmul(self, a, b, out_dtype: np.dtype | None = None):
        """``a @ b`` with float32 accumulation; the result in the storage dtype unless
        ``out_dtype`` is given (float32 for partial sums that are reduced later).

        a: [..., K] (leading dims are flattened for the GEMM), b: [K, N]. On the GPU, bf16
        operands go to one cublasGemmEx call that writes bf16 or float32 directly: CuPy's
        matmul has no float32 output for bf16 inputs, and upcasting the weights on every
        call would cost a full copy of them.
        """
        out_dtype = self.dtype if out_dtype is None else np.dtype(out_dtype)
        if not self.on_gpu:
            return np.matmul(a.astype(F32, copy=False), b.astype(F32, copy=False)).astype(
                out_dtype, copy=False)
        xp = self.xp
        if b.ndim == 2 and a.ndim >= 2 and a.dtype == b.dtype == BF16 \
                and out_dtype in (BF16, F32):
            lead = a.shape[:-1]
            out = self._gemm_bf16(a.reshape(-1, a.shape[-1]), b, out_dtype)
            if out is not None:
                return out.reshape(*lead, b.shape[1])
        # float32 operands, mixed dtypes, batched (CuPy's batched matmul has no bf16 path:
        # it raises TypeError) or a refused GemmEx: a float32 GEMM on float32 copies.
        return xp.matmul(a.astype(F32, copy=False), b.astype(F32, copy=False)).astype(
            out_dtype, copy=False)

    def _gemm_bf16(self, a, b, out_dtype):
        """cublasGemmEx, or None (after one warning) where cuBLAS refuses it."""
        if self._gemm is None:
            self._gemm = CublasGemm(self.xp)
        if not self._gemm.usable:
            return None
        try:
            return self._gemm(a, b, out_dtype)
        except Exception as exc:  # CUBLASError (e.g. NOT_SUPPORTED) or a missing libcublas
            self._gemm.usable = False
            self.matmul_path = (f"CuPy float32 matmul on upcast copies (cublasGemmEx failed: "
                                f"{type(exc).__name__}: {exc})")
            warnings.warn(f"bf16 GEMM fell back to float32 copies: {self.matmul_path}")
            return None

    def erfc(self, x):
        """Complementary error function, computed in float32 (CuPy's erfc has no bf16
        loop; bf16 input is widened first)."""
        if self.on_gpu:
            import cupyx.scipy.special

            return cupyx.scipy.special.erfc(x.astype(F32, copy=False))
        return erfc_numpy(x)

    def gelu(self, x, out=None):
        """Exact (erf) GELU in float32, written as ``x/2 * erfc(-x/sqrt 2)`` so that large
        negative inputs do not cancel. ``out`` (float32, x's shape; may be x itself) takes
        the result without a new allocation. On the GPU it is one elementwise kernel: the
        unfused form makes four float32 temporaries of x's size (40 GiB for one expert's
        hidden layer at paper size)."""
        if self.on_gpu:
            if self._gelu_kernel is None:
                self._gelu_kernel = self.xp.ElementwiseKernel(
                    "float32 x", "float32 y",
                    "y = 0.5f * x * erfcf(x * -0.70710678118654752f)", "spmd_moe_gelu_erfc")
            x = x.astype(F32, copy=False)
            return self._gelu_kernel(x) if out is None else self._gelu_kernel(x, out)
        value = 0.5 * x * self.erfc(x * np.float32(-0.7071067811865476))
        if out is None:
            return value
        out[...] = value
        return out

    # --- timing ----------------------------------------------------------------------

    def timer(self) -> "PhaseTimer":
        return PhaseTimer(self)


class HostCopy:
    """A device array on its way to the host (Backend.to_host_async): ``wait()`` returns it
    as a host array once the copy's event has passed (the host waits for that event only);
    ``event`` is None for a copy that was done at once."""

    def __init__(self, host: np.ndarray, event=None, memory=None):
        self.host, self.event, self.memory = host, event, memory

    def wait(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
            # The pinned block goes back to its pool: the caller gets its own copy.
            self.host, self.event, self.memory = np.array(self.host), None, None
        return self.host


# cuBLAS / CUDA library enum values (cublas_api.h, library_types.h): part of the C ABI.
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N = 0
CUBLAS_POINTER_MODE_HOST = 0
_CUDA_TYPE = {BF16: CUDA_R_16BF, F32: CUDA_R_32F}


class CublasGemm:
    """Row-major ``C[m, n] = A[m, k] @ B[k, n]`` by one ``cublasGemmEx``: bf16 A and B,
    float32 accumulation (CUBLAS_COMPUTE_32F), bf16 or float32 C.

    cuBLAS is column-major: the row-major C is the column-major C^T = B^T A^T, so the call
    passes B first with the dimensions swapped, and nothing is transposed or copied.
    """

    def __init__(self, cupy):
        self.cupy = cupy
        self.usable = True
        self._one = np.ones(1, dtype=F32)     # host scalars: read during the call
        self._zero = np.zeros(1, dtype=F32)

    def __call__(self, a, b, out_dtype, out=None):
        """``a @ b`` as a new [m, n] array of ``out_dtype``, or written into ``out`` (a
        C-contiguous [m, n] array of that dtype, e.g. a row block of a larger output)."""
        cp = self.cupy
        cublas = cp.cuda.cublas                # loads libcublas on first use
        a = cp.ascontiguousarray(a)
        b = cp.ascontiguousarray(b)
        m, k = a.shape
        k2, n = b.shape
        assert k == k2, (a.shape, b.shape)
        assert max(m, n, k) < 2 ** 31, "cuBLAS dimensions are C ints"
        if out is None:
            out = cp.empty((m, n), dtype=out_dtype)
        assert out.shape == (m, n) and out.dtype == out_dtype and out.flags.c_contiguous
        if m == 0 or n == 0:
            return out
        if k == 0:
            out.fill(0)
            return out
        handle = cp.cuda.device.get_cublas_handle()
        mode = cublas.getPointerMode(handle)
        cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
        try:
            cublas.gemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k,
                          self._one.ctypes.data, b.data.ptr, _CUDA_TYPE[b.dtype], n,
                          a.data.ptr, _CUDA_TYPE[a.dtype], k,
                          self._zero.ctypes.data, out.data.ptr, _CUDA_TYPE[out.dtype], n,
                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
        finally:
            cublas.setPointerMode(handle, mode)
        return out


def bf16_census(bk: Backend) -> dict[str, str]:
    """Which bfloat16 operations work on this backend, op by op: ``"ok"``, ``"wrong: ..."``
    or ``"error: ..."``. The raw ``bk.xp`` calls show what the array library supports; the
    ``bk.`` entries are the backend's own paths, which the engine relies on. Small arrays;
    for ``spmd-moe info``-style diagnostics and bin/gpu-check, never on a hot path."""
    xp = bk.xp
    rng = np.random.default_rng(0)
    host = rng.standard_normal((6, 8), dtype=np.float32).astype(BF16)      # [6, 8]
    other = rng.standard_normal((8, 5), dtype=np.float32).astype(BF16)     # [8, 5]
    index_host = np.array([4, 0, 5, 1], dtype=np.int64)
    results: dict[str, str] = {}

    def check(name, fn, want=None, rtol=0.0):
        try:
            got = fn()
            if want is not None:
                got_host = bk.to_host(got).astype(np.float64)
                want64 = np.asarray(want, dtype=np.float64)
                if got_host.shape != want64.shape:
                    results[name] = f"wrong: shape {got_host.shape} != {want64.shape}"
                    return
                err = float(np.max(np.abs(got_host - want64))) if want64.size else 0.0
                scale = float(np.max(np.abs(want64))) if want64.size else 1.0
                if not err <= rtol * max(scale, 1e-30):
                    results[name] = f"wrong: max abs error {err:.3g} (scale {scale:.3g})"
                    return
            results[name] = "ok"
        except Exception as exc:  # the point: record whatever the library raises
            results[name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    x = xp.asarray(host)
    w = xp.asarray(other)
    index = xp.asarray(index_host)
    f32 = host.astype(np.float32)
    ref_mm = f32 @ other.astype(np.float32)
    check("asarray/to_host round trip", lambda: x, host)
    check("astype bf16->f32", lambda: x.astype(F32), f32)
    check("astype f32->bf16", lambda: xp.asarray(f32).astype(BF16), host)
    check("exp", lambda: xp.exp(x), np.exp(f32).astype(BF16), rtol=1e-2)
    check("max", lambda: x.max(axis=-1), f32.max(axis=-1))
    check("sum", lambda: x.sum(axis=-1), f32.sum(axis=-1), rtol=5e-2)
    check("argmax", lambda: xp.argmax(x, axis=-1), f32.argmax(axis=-1))
    check("take x[index]", lambda: x[index], host[index_host])
    check("concatenate", lambda: xp.concatenate([x, x]), np.concatenate([host, host]))

    def scatter():
        out = xp.zeros((6, 8), dtype=BF16)
        out[index] = x[:4]
        return out

    want_scatter = np.zeros((6, 8), dtype=BF16)
    want_scatter[index_host] = host[:4]
    check("scatter out[index] = rows", scatter, want_scatter)
    check("matmul 2-D bf16", lambda: xp.matmul(x, w), ref_mm, rtol=2e-2)
    check("matmul 3-D bf16 (batched)", lambda: xp.matmul(x[None], w[None]), ref_mm[None],
          rtol=2e-2)
    if bk.on_gpu:
        def cupyx_erfc():
            import cupyx.scipy.special

            return cupyx.scipy.special.erfc(x)

        check("cupyx erfc", cupyx_erfc, erfc_numpy(f32), rtol=1e-2)
    wb, xb = bk.param(other), bk.asarray(host)
    check("bk.matmul -> float32", lambda: bk.matmul(xb, wb, out_dtype=F32), ref_mm, rtol=1e-5)
    check("bk.matmul -> bf16", lambda: bk.matmul(xb, wb, out_dtype=BF16),
          ref_mm.astype(BF16), rtol=1e-2)
    check("bk.gelu", lambda: bk.gelu(xb.astype(F32)),
          0.5 * f32 * erfc_numpy(f32 * np.float32(-0.7071067811865476)), rtol=1e-6)
    check("bk.erfc bf16", lambda: bk.erfc(xb), erfc_numpy(f32), rtol=1e-6)
    check("bk.argmax bf16", lambda: bk.argmax(xb), f32.argmax(axis=-1))
    check("bk.take_rows", lambda: bk.take_rows(xb, index), host[index_host])

    def put_rows():
        out = xp.zeros((6, 8), dtype=BF16)
        bk.put_rows(out, index, xb[:4])
        return out

    check("bk.put_rows", put_rows, want_scatter)
    return results


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

    With ``spans`` a list (trace.py's Tracer.arm), each phase is also kept as a span
    ``[name, start, stop, context, bytes]``: host seconds on NumPy, the CUDA events on the
    GPU; ``context`` is where the running stage pass is (``self.cursor``: trace.PassCursor)
    unless the phase names its own; consecutive spans of one phase in one context are one span;
    past ``span_room`` spans are counted in ``span_dropped``, not kept.
    """

    backend: Backend
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    _events: list[tuple[str, Any, Any]] = field(default_factory=list)
    spans: list | None = None
    span_room: int = 0
    span_dropped: int = 0
    cursor: PassCursor = field(default_factory=PassCursor)
    _last_span: list | None = None        # the span the last phase went into (None: dropped)

    @contextlib.contextmanager
    def phase(self, name: str, context: Any = None) -> Iterator[None]:
        if self.backend.on_gpu:
            cuda = self.backend.xp.cuda
            start, stop = cuda.Event(), cuda.Event()
            start.record()
            try:
                yield
            finally:
                stop.record()
                self._events.append((name, start, stop))
                if self.spans is not None:
                    self._span(name, start, stop, context)
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                stop = time.perf_counter()
                self.seconds[name] = self.seconds.get(name, 0.0) + stop - start
                if self.spans is not None:
                    self._span(name, start, stop, context)

    def _span(self, name: str, start, stop, context) -> None:
        context = self.cursor.context if context is None else context
        spans = self.spans
        if spans and spans[-1] is self._last_span and spans[-1][0] == name and \
                spans[-1][3] == context:
            spans[-1][2] = stop
        elif len(spans) < self.span_room:
            spans.append([name, start, stop, context, 0])
            self._last_span = spans[-1]
        else:
            self.span_dropped += 1
            self._last_span = None

    def add_bytes(self, name: str, count: int) -> None:
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + int(count)
        if self.spans is not None and self._last_span is not None and \
                self._last_span[0] == name:
            self._last_span[4] += int(count)     # the bytes of the phase just timed

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


def available_memory(choice: BackendChoice, node_size: int) -> tuple[int, str]:
    """Bytes this rank may use: the device's free memory over the ranks sharing it, or the
    host's available memory over the node's ranks."""
    if choice.name == "cupy":
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        sharing = -(-node_size // max(1, choice.device_count))
        return free // sharing, f"GPU {choice.device_id} free memory / {sharing} rank(s)"
    return host_memory(node_size)
