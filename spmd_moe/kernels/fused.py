"""Launch code of the fused kernels: :class:`FusedKernels`, what a CuPy backend calls as
``backend.kernels``.

Each method has the signature and semantics of the generic array code it replaces
(model.causal_attention, experts.expert_ffn, Dispatcher.permute and
Dispatcher.combine_postprocess); inputs are CuPy arrays on the current device, ``*_host``
arguments NumPy int64 arrays. Kernels run on CuPy's current stream (RawKernel launches
and cupy.matmul both use it), so they order with the rest of the backend's work and
nothing here synchronises the host.

Notation: Tq/Tk query/key rows, h query heads, hk key/value heads (g = h/hk), D head dim,
T tokens, k top-k, R = T*k routed rows, d width, F expert hidden width.
"""
from __future__ import annotations

import copy
import math
import os

import numpy as np

from ..backend import BF16, F32
from .compile import load_module
from .schedule import (COMBINE_THREADS, PADDED_HEAD_DIMS, TILE_ROWS, attention_schedule,
                       attention_variant, ffn_row_chunk, row_block, row_grid,
                       row_vector_bytes, swiglu_element_bytes)
from .schedule import tile_rows as choose_tile_rows

LOG2E = 1.4426950408889634
# Bound on the expert FFN's [rows, F] hidden chunk. Paper shapes (F = 16384, bf16): 16384
# rows per pass, GEMMs of 16384 x 16384 x 4096 (big enough for cuBLAS's peak), instead of a
# 5 GB hidden for all 160000 rows. SPMD_MOE_FFN_WORKSPACE_MB overrides it, for measuring
# whether L2-sized chunks (~32 MB: the GELU pass hits L2, not DRAM) pay for more launches.
FFN_WORKSPACE_BYTES = 512 << 20
FFN_WORKSPACE_ENV = "SPMD_MOE_FFN_WORKSPACE_MB"
# Query rows per attention tile: "auto" (schedule.tile_rows: 128 for long bf16 prefill, 64
# otherwise), or 64 / 128 to force one for a measurement.
ATTENTION_TILE_ENV = "SPMD_MOE_ATTENTION_TILE"
ELEMENTWISE_THREADS = 256
# Dynamic shared memory above this needs the per-kernel opt-in attribute.
DEFAULT_SHARED_LIMIT = 48 << 10


def _dtype_name(dtype) -> str:
    if dtype == BF16:
        return "bfloat16"
    if dtype == F32:
        return "float32"
    raise AssertionError(f"fused kernels take bfloat16 or float32 arrays, not {dtype}")


def cublas_gemm_to_f32(a, b, out) -> None:
    """out[M, N] float32 = a[M, K] @ b[K, N] for bf16 a, b: the backend's one cublasGemmEx
    (float32 accumulation and output; cupy.matmul would round to bf16)."""
    import cupy

    from ..backend import CublasGemm

    CublasGemm(cupy)(a, b, F32, out=out)


def _output(cp, out, shape: tuple, dtype):
    """A new [shape] array, or the caller's ``out`` after checking it fits (tests pass
    NaN-filled ones so that an element the kernel fails to write shows)."""
    if out is None:
        return cp.empty(shape, dtype=dtype)
    assert out.shape == shape and out.dtype == dtype and out.flags.c_contiguous, \
        (out.shape, shape, out.dtype, dtype)
    return out


def _attention_tile_setting() -> int | None:
    """$SPMD_MOE_ATTENTION_TILE: None for "auto" (or unset), else 64 or 128. Anything else
    is refused (so the kernels do not load, and info and the report say why)."""
    value = os.environ.get(ATTENTION_TILE_ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in tuple(str(rows) for rows in TILE_ROWS):
        raise ValueError(f"{ATTENTION_TILE_ENV}={value!r} is not auto, "
                         + " or ".join(str(rows) for rows in TILE_ROWS))
    return int(value)


class FusedKernels:
    """The fused kernels of one device.

    ``cp`` is the array module (CuPy); ``load(source name)`` gives a module whose
    ``get_function(name)`` returns launchable kernels (compile.load_module: a
    cupy.RawModule); ``gemm_to_f32(a, b, out)`` writes a bf16 product as float32
    (:func:`cublas_gemm_to_f32`; by default an upcast matmul). Build it with
    :meth:`for_current_device`; the tests hand in a NumPy stand-in to run this launch code
    without a GPU.
    """

    def __init__(self, cp, arch: str, n_sm: int, shared_limit: int, load=load_module,
                 gemm_to_f32=None):
        if int(arch) < 80:
            # bf16 mma.sync, ldmatrix and cp.async are sm_80 instructions.
            raise RuntimeError(f"device is sm_{arch}; the fused kernels need sm_80 or newer")
        self.cp, self.arch, self.n_sm, self.shared_limit = cp, arch, n_sm, shared_limit
        self.attention_module = load("flash_attention.cu")
        self.ffn_module = load("expert_ffn.cu")
        self.permute_module = load("permute.cu")
        self.ffn_workspace_bytes = int(float(os.environ.get(FFN_WORKSPACE_ENV, 0)) * 2**20) \
            or FFN_WORKSPACE_BYTES
        self.attention_tile = _attention_tile_setting()
        self.gemm_to_f32 = gemm_to_f32 or self._upcast_gemm_to_f32
        # None while attention is fused; else why a model's attention takes the generic
        # array code (without_attention), the FFN and permutation staying fused.
        self.attention_off: str | None = None
        self._functions: dict[str, object] = {}
        self._schedule_key: tuple | None = None
        self._schedule = None

    @classmethod
    def for_current_device(cls) -> "FusedKernels":
        """Compiled (or taken from CuPy's cache) now, so that a compile failure surfaces in
        attach(), not in the middle of a layer."""
        import cupy

        device = cupy.cuda.Device()
        return cls(cupy, str(device.compute_capability),
                   int(device.attributes["MultiProcessorCount"]),
                   int(device.attributes["MaxSharedMemoryPerBlockOptin"]),
                   gemm_to_f32=cublas_gemm_to_f32)

    def _upcast_gemm_to_f32(self, a, b, out):
        self.cp.matmul(a.astype(F32), b.astype(F32), out=out)

    @property
    def fused_attention(self) -> bool:
        """Whether :meth:`attention` serves this model (model.causal_attention asks)."""
        return self.attention_off is None

    def without_attention(self, reason: str) -> "FusedKernels":
        """These kernels with attention left to the generic array code (``reason``: why,
        e.g. a head dim with no instantiation); expert FFN and permutation stay fused. A
        copy: the loaded kernels are shared by every backend of the process."""
        partial = copy.copy(self)
        partial.attention_off = reason
        return partial

    def describe(self) -> str:
        if self.attention_off is None:
            tiles = ("64/128-query tiles by sequence length" if self.attention_tile is None
                     else f"{self.attention_tile}-query tiles ({ATTENTION_TILE_ENV})")
            attention = (f"flash attention (bf16 on tensor cores, {tiles}; float32 on FMA; "
                         f"even head dims <= {PADDED_HEAD_DIMS[-1]}; grouped-query K/V "
                         "heads)")
        else:
            attention = f"attention: generic array code ({self.attention_off})"
        return (f"fused CUDA kernels for sm_{self.arch}: {attention}, expert FFN (cuBLAS + "
                f"in-place GELU or SwiGLU), permutation")

    def _function(self, module, name: str, shared_bytes: int = 0):
        fn = self._functions.get(name)
        if fn is None:
            fn = module.get_function(name)
            if shared_bytes > DEFAULT_SHARED_LIMIT:
                assert shared_bytes <= self.shared_limit, (name, shared_bytes, self.shared_limit)
                fn.max_dynamic_shared_size_bytes = shared_bytes
            self._functions[name] = fn
        return fn

    # --- attention -----------------------------------------------------------------------

    def _attention_schedule(self, q_starts_host, q_lengths_host, k_starts_host, k_lengths_host,
                            heads: int, block_m: int):
        """The tile and combine lists on the device. Every layer of a pass sees the same
        lengths, so the last schedule is kept: one small host->device copy per pass."""
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (
            q_starts_host, q_lengths_host, k_starts_host, k_lengths_host)]
        key = (heads, self.n_sm, block_m, *(a.tobytes() for a in arrays))
        if key != self._schedule_key:
            schedule = attention_schedule(*arrays, heads=heads, n_sm=self.n_sm,
                                          block_m=block_m)
            self._schedule = (schedule, self.cp.asarray(schedule.tiles),
                              self.cp.asarray(schedule.combine))
            self._schedule_key = key
        return self._schedule

    def attention(self, q, q_starts_host, q_lengths_host, k, v, k_starts_host, k_lengths_host,
                  scale: float, out=None, tile_rows: int | None = None):
        """Causal attention of packed queries against packed (or cached) keys, as
        model.causal_attention. q: [Tq, h, D]; k, v: [Tk, hk, D] with hk dividing h (query
        head j reads K/V head j // (h/hk): grouped-query attention; hk = h: multi-head),
        C-contiguous, bf16 or float32 (all the same); ``*_host``: int64 [b]. Returns
        [Tq, h*D] in q's dtype; rows of no sequence are left unwritten, as in the generic
        code. ``out`` (optional, [Tq, h*D] C-contiguous, 4-byte aligned) receives the result
        instead of a new array.
        ``tile_rows`` (64 or 128) forces the tile height, which is otherwise
        $SPMD_MOE_ATTENTION_TILE or the schedule's choice by sequence length (bf16 only:
        float32 and unaligned inputs always run 64-row tiles)."""
        assert self.attention_off is None, self.attention_off
        cp = self.cp
        n_q, heads, head_dim = q.shape
        kv_heads = k.shape[1] if k.ndim == 3 else 0
        assert k.ndim == 3 and k.shape[2] == head_dim and v.shape == k.shape, \
            (q.shape, k.shape, v.shape)
        assert kv_heads >= 1 and heads % kv_heads == 0, (q.shape, k.shape)
        assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
        assert q.flags.c_contiguous and k.flags.c_contiguous and v.flags.c_contiguous
        dtype_name = _dtype_name(q.dtype)
        assert (np.asarray(q_starts_host) + np.asarray(q_lengths_host) <= n_q).all()
        assert (np.asarray(k_starts_host) + np.asarray(k_lengths_host) <= k.shape[0]).all()
        # The kernels read rows in 4- or 16-byte copies from the base addresses: a bf16 view
        # starting at an odd element (never made by the engine) is copied to a fresh,
        # aligned allocation first; 16-byte copies need all three 16-byte aligned.
        q, k, v = (x if x.data.ptr % 4 == 0 else x.copy() for x in (q, k, v))
        if tile_rows is None:
            tile_rows = self.attention_tile or choose_tile_rows(q_lengths_host, heads,
                                                                self.n_sm, dtype_name)
        variant = attention_variant(head_dim, dtype_name, tile_rows,
                                    (q.data.ptr, k.data.ptr, v.data.ptr))

        out = _output(cp, out, (n_q, heads * head_dim), q.dtype)           # [Tq, h*D]
        assert out.data.ptr % 4 == 0, "output rows are stored in 4-byte pairs"
        schedule, tiles, combine = self._attention_schedule(
            q_starts_host, q_lengths_host, k_starts_host, k_lengths_host, heads,
            variant.block_m)
        if schedule.n_tiles == 0:
            return out
        assert schedule.n_tiles * heads < 2**31
        # Split tiles write normalised partials [slot, h, BM, D] and their log2-sum-exp.
        slots = max(schedule.n_slots, 1)
        part_o = cp.empty((slots, heads, variant.block_m, head_dim), dtype=F32)
        part_lse = cp.empty((slots, heads, variant.block_m), dtype=F32)
        kernel = self._function(self.attention_module, variant.kernel, variant.shared_bytes)
        kernel((schedule.n_tiles * heads,), (variant.threads,),
               (q, k, v, out, part_o, part_lse, tiles, np.int32(schedule.n_tiles),
                np.int32(heads), np.int32(kv_heads), np.int32(head_dim),
                np.float32(scale * LOG2E)),
               shared_mem=variant.shared_bytes)
        if len(schedule.combine):
            merge = self._function(self.attention_module, variant.combine_kernel)
            merge((len(schedule.combine) * heads,), (COMBINE_THREADS,),
                  (part_o, part_lse, combine, out, np.int32(heads), np.int32(head_dim),
                   np.int32(variant.block_m)))
        return out

    # --- expert FFN ----------------------------------------------------------------------

    def _elementwise_blocks(self, n: int, per_thread: int) -> int:
        """Blocks of a grid-stride elementwise pass, ``per_thread`` elements per step."""
        return max(1, min(math.ceil(n / per_thread / ELEMENTWISE_THREADS), 32 * self.n_sm))

    def gelu_(self, hidden):
        """Exact (erf) GELU of a C-contiguous bf16 or float32 array, in place."""
        assert hidden.flags.c_contiguous and hidden.data.ptr % 16 == 0
        bf16 = _dtype_name(hidden.dtype) == "bfloat16"
        name = "gelu_bf16_inplace" if bf16 else "gelu_f32_inplace"
        n = hidden.size
        if n == 0:
            return hidden
        per_thread = 8 if bf16 else 4   # one 16-byte vector
        self._function(self.ffn_module, name)((self._elementwise_blocks(n, per_thread),),
                                              (ELEMENTWISE_THREADS,), (hidden, np.int64(n)))
        return hidden

    def swiglu(self, gate, up, out):
        """``out = silu(gate) * up``: gate, up float32 [rows, F] (the GEMMs' accumulators),
        out [rows, F] bf16 or float32 (float32: may be gate itself), rounded once; the
        operations of experts.silu in its order. All C-contiguous and 16-byte aligned."""
        assert gate.dtype == up.dtype == F32 and gate.shape == up.shape == out.shape, \
            (gate.dtype, up.dtype, gate.shape, up.shape, out.shape)
        for array in (gate, up, out):
            assert array.flags.c_contiguous and array.data.ptr % 16 == 0
        name = "swiglu_bf16" if _dtype_name(out.dtype) == "bfloat16" else "swiglu_f32"
        n = gate.size
        if n:
            self._function(self.ffn_module, name)((self._elementwise_blocks(n, 4),),
                                                  (ELEMENTWISE_THREADS,),
                                                  (gate, up, out, np.int64(n)))
        return out

    def _gemm_f32(self, a, b, out) -> None:
        """out float32 [M, N] = a @ b with float32 accumulation, never rounded: cuBLAS's
        float32 output for bf16 operands, a float32 GEMM for float32 ones."""
        if a.dtype == F32:
            self.cp.matmul(a, b, out=out)
        else:
            self.gemm_to_f32(a, b, out)

    def expert_ffn(self, x, w1, w2, out_dtype=None, *, w3=None, out=None):
        """``GELU(x W1) W2``, or with ``w3`` SwiGLU ``(silu(x W1) * x W3) W2``: x [R, d],
        w1 (and w3) [d, F], w2 [F, d], all bf16 or all float32 -> [R, d] in that dtype, or
        in ``out_dtype`` = float32 (the TP baseline's partial sums, reduced before rounding:
        the second GEMM then writes cuBLAS's float32 accumulator).

        cuBLAS GEMMs (float32 accumulation) with one elementwise pass between them, over
        row chunks so that the [rows, F] intermediates stay under ``ffn_workspace_bytes``.
        GELU: in place on the hidden after its rounding to the storage dtype (the generic
        code rounds after the GELU): a difference of one bf16 rounding. SwiGLU: x W1 and
        x W3 are written as float32 (never rounded) and the product rounded once, as the
        generic code (experts.expert_ffn) does. ``out`` (optional, [R, d] of the output
        dtype) receives the result."""
        cp = self.cp
        n_rows, d = x.shape
        d_ff = w1.shape[1]
        assert w1.shape == (d, d_ff) and w2.shape == (d_ff, d), (x.shape, w1.shape, w2.shape)
        assert x.dtype == w1.dtype == w2.dtype, (x.dtype, w1.dtype, w2.dtype)
        assert w3 is None or (w3.shape == w1.shape and w3.dtype == w1.dtype), \
            (w1.shape, w3.shape)
        _dtype_name(x.dtype)                                                # bf16 or float32
        out_dtype = x.dtype if out_dtype is None else np.dtype(out_dtype)
        assert out_dtype in (x.dtype, F32), out_dtype
        x = cp.ascontiguousarray(x)
        out = _output(cp, out, (n_rows, d), out_dtype)                      # [R, d]
        if n_rows == 0:
            return out
        element_bytes = x.dtype.itemsize if w3 is None else swiglu_element_bytes(
            x.dtype.itemsize)
        chunk = ffn_row_chunk(n_rows, d_ff, element_bytes, self.ffn_workspace_bytes)
        rows = min(chunk, n_rows)
        if w3 is None:
            hidden_buffer = cp.empty((rows, d_ff), dtype=x.dtype)           # [chunk, F]
        else:
            # Separate allocations: each 16-byte aligned for the vector loads whatever F.
            gate_buffer = cp.empty((rows, d_ff), dtype=F32)                  # [chunk, F]
            up_buffer = cp.empty((rows, d_ff), dtype=F32)                    # [chunk, F]
            hidden_buffer = gate_buffer if x.dtype == F32 else cp.empty((rows, d_ff),
                                                                        dtype=x.dtype)
        for r0 in range(0, n_rows, chunk):
            r1 = min(n_rows, r0 + chunk)
            hidden = hidden_buffer[:r1 - r0]                                 # [rows, F]
            if w3 is None:
                cp.matmul(x[r0:r1], w1, out=hidden)
                self.gelu_(hidden)
            else:
                gate, up = gate_buffer[:r1 - r0], up_buffer[:r1 - r0]       # float32 [rows, F]
                self._gemm_f32(x[r0:r1], w1, gate)
                self._gemm_f32(x[r0:r1], w3, up)
                self.swiglu(gate, up, hidden)
            if out_dtype == x.dtype:
                cp.matmul(hidden, w2, out=out[r0:r1])
            else:
                self.gemm_to_f32(hidden, w2, out[r0:r1])
        return out

    # --- permutation ---------------------------------------------------------------------

    @staticmethod
    def _order(order):
        assert order.ndim == 1 and order.dtype.kind in "iu", (order.shape, order.dtype)
        return order.astype(np.int64, copy=False)

    def gather_rows(self, x, order, top_k: int, out=None):
        """Send rows grouped by expert: x [T, d], order int [R] (pair index t*k + j of each
        row) -> [R, d] with row i = x[order[i] // top_k]. ``out`` (optional, [R, d])
        receives the result."""
        cp = self.cp
        assert x.ndim == 2 and x.flags.c_contiguous
        order = self._order(order)
        n_rows, d = order.shape[0], x.shape[1]
        out = _output(cp, out, (n_rows, d), x.dtype)                        # [R, d]
        if n_rows == 0 or d == 0:
            return out
        row_bytes = d * x.dtype.itemsize
        width = row_vector_bytes(row_bytes, x.data.ptr, out.data.ptr)
        row_vecs = row_bytes // width
        block = row_block(row_vecs)
        kernel = self._function(self.permute_module, f"gather_rows_v{width}")
        kernel((row_grid(n_rows, block[1], self.n_sm),), block,
               (x, order, out, np.int64(n_rows), np.int32(row_vecs), np.int32(top_k)))
        return out

    def unpermute_weighted(self, rows, order, weights, out=None):
        """Combine: rows [R, d] in send order, order int [R], weights float32 [T, k] ->
        float32 [T, d], out[t] = sum_j weights[t, j] * rows[i] where order[i] = t*k + j,
        summed j = 0..k-1 in float32 (bit for bit the generic code's order). ``out``
        (optional, float32 [T, d]) receives the result."""
        cp = self.cp
        assert rows.ndim == 2 and rows.flags.c_contiguous
        order = self._order(order)
        weights = cp.ascontiguousarray(weights, dtype=F32)
        n_tokens, top_k = weights.shape
        n_rows, d = rows.shape
        assert order.shape[0] == n_rows == n_tokens * top_k, \
            (order.shape, rows.shape, weights.shape)
        assert n_rows < 2**31   # the inverse permutation is int32
        name = _dtype_name(rows.dtype)
        out = _output(cp, out, (n_tokens, d), F32)                          # [T, d]
        if n_tokens == 0 or d == 0:
            return out
        inverse = cp.empty(n_rows, dtype=np.int32)                           # [R]
        invert = self._function(self.permute_module, "inverse_permutation")
        invert((row_grid(n_rows, ELEMENTWISE_THREADS, self.n_sm),), (ELEMENTWISE_THREADS,),
               (order, inverse, np.int64(n_rows)))
        # 16-byte loads (8 bf16 or 4 float) and float4 stores when d and the bases allow.
        width = row_vector_bytes(d * rows.dtype.itemsize, rows.data.ptr, out.data.ptr)
        width = 16 if width == 16 else rows.dtype.itemsize
        per_vec = width // rows.dtype.itemsize
        short = "bf16" if name == "bfloat16" else "f32"
        block = row_block(d // per_vec)
        kernel = self._function(self.permute_module, f"unpermute_weighted_{short}_v{width}")
        kernel((row_grid(n_tokens, block[1], self.n_sm),), block,
               (rows, inverse, weights, out, np.int64(n_tokens), np.int32(d), np.int32(top_k)))
        return out
