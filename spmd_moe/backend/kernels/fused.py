"""Launch code of the fused kernels: :class:`FusedKernels`, what a CuPy backend calls as
``backend.kernels``.

Each method has the signature and semantics of the generic array code it replaces
(model.causal_attention, experts.expert_ffn, Dispatcher.permute and
Dispatcher.unpermute; model.rms_norm, model.add_rms_norm, model.qk_norm_rope,
router.route and Dispatcher.sort for the row-wise kernels); inputs are
CuPy arrays on the current device, ``*_host`` arguments NumPy int64 arrays. Kernels and
GEMMs (the backend's cublasGemmEx for bf16, cupy.matmul for float32) run on CuPy's
current stream, so they order with the rest of the backend's work and nothing here
synchronises the host.

Notation: Tq/Tk query/key rows, h query heads, hk key/value heads (g = h/hk), D head dim,
T tokens, k top-k, R = T*k routed rows, d width, F expert hidden width.
"""
from __future__ import annotations

import copy
import math
import os

import numpy as np

from ..array import BF16, F32
from .compile import load_module
from .schedule import (COMBINE_THREADS, MAX_HEADS, MAX_HEAD_DIM, MAX_ROUTER_EXPERTS,
                       MLA_HEADS, MLA_MAX_LATENT, MLA_THREADS, ORDER_THREADS, PADDED_HEAD_DIMS,
                       ROUTER_THREADS, ROW_THREADS, TILE_ROWS, attention_schedule,
                       attention_variant, ffn_row_chunk, mla_schedule, mla_shared_bytes,
                       row_block, row_grid, row_vector_bytes, swiglu_element_bytes,
                       tile_rows as choose_tile_rows)

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
# Attention schedules kept on the device (per pass in flight, and a decode step's two).
SCHEDULES_KEPT = 4
# Dynamic shared memory above this needs the per-kernel opt-in attribute.
DEFAULT_SHARED_LIMIT = 48 << 10


def _dtype_name(dtype) -> str:
    if dtype == BF16:
        return "bfloat16"
    if dtype == F32:
        return "float32"
    raise AssertionError(f"fused kernels take bfloat16 or float32 arrays, not {dtype}")


def cublas_gemm(a, b, out) -> None:
    """out[M, N] = a[M, K] @ b[K, N] for bf16 a, b: the backend's one cublasGemmEx (float32
    accumulation; out bf16 or float32), the call every bf16 GEMM of the engine makes."""
    import cupy

    from ..array import CublasGemm

    CublasGemm(cupy)(a, b, out.dtype, out=out)


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
    cupy.RawModule); ``gemm(a, b, out)`` writes a bf16 product into ``out``, bf16 or float32,
    with float32 accumulation (:func:`cublas_gemm`; by default a matmul of float32 copies).
    Build it with
    :meth:`for_current_device`; the tests hand in a NumPy stand-in to run this launch code
    without a GPU.
    """

    def __init__(self, cp, arch: str, n_sm: int, shared_limit: int, load=load_module,
                 gemm=None):
        if int(arch) < 80:
            # bf16 mma.sync, ldmatrix and cp.async are sm_80 instructions.
            raise RuntimeError(f"device is sm_{arch}; the fused kernels need sm_80 or newer")
        self.cp, self.arch, self.n_sm, self.shared_limit = cp, arch, n_sm, shared_limit
        self.attention_module = load("flash_attention.cu")
        self.ffn_module = load("expert_ffn.cu")
        self.permute_module = load("permute.cu")
        self.rowwise_module = load("rowwise.cu")
        self.mla_module = load("mla.cu")
        self.ffn_workspace_bytes = int(float(os.environ.get(FFN_WORKSPACE_ENV, 0)) * 2**20) \
            or FFN_WORKSPACE_BYTES
        self.attention_tile = _attention_tile_setting()
        self.gemm = gemm or self._upcast_gemm
        # None while attention is fused; else why a model's attention takes the generic
        # array code (without_attention), the FFN and permutation staying fused.
        self.attention_off: str | None = None
        # Row-wise pieces ("router", "qk_rope") left to the generic array code, and why
        # (fit_rowwise); RMSNorm has no limit and is always fused.
        self.rowwise_off: dict[str, str] = {"mla_decode": "no latent attention"}
        self._functions: dict[str, object] = {}
        # Attention schedules by lengths, newest last: two micro-batches in flight alternate
        # layer by layer, and each keeps its own (no re-upload per layer).
        self._schedules: dict[tuple, tuple] = {}
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
                   gemm=cublas_gemm)

    def _upcast_gemm(self, a, b, out):
        product = self.cp.matmul(a.astype(F32), b.astype(F32))
        out[...] = product if out.dtype == F32 else product.astype(out.dtype)

    @property
    def fused_attention(self) -> bool:
        """Whether :meth:`attention` serves this model (model.causal_attention asks)."""
        return self.attention_off is None

    def fits_attention(self, head_dim: int, v_dim: int) -> bool:
        """Whether :meth:`attention` has a kernel for queries and keys of ``head_dim`` and
        values of ``v_dim`` (fused attention on)."""
        if self.attention_off is not None:
            return False
        try:
            attention_variant(head_dim, "float32", v_dim=v_dim)
        except ValueError:
            return False
        return True

    def without_attention(self, reason: str) -> "FusedKernels":
        """These kernels with attention left to the generic array code (``reason``: why,
        e.g. a head dim with no instantiation); expert FFN and permutation stay fused. A
        copy: the loaded kernels are shared by every backend of the process."""
        partial = copy.copy(self)
        partial.attention_off = reason
        return partial

    def fuses(self, piece: str) -> bool:
        """Whether kernel ``piece`` ("router": softmax/top-k; "qk_rope": q/k norm and RoPE;
        "mla_decode": MLA's absorbed decode) serves this model (fit_rowwise)."""
        return piece not in self.rowwise_off

    def fit_rowwise(self, n_experts: int, heads: int, kv_heads: int, qk_norm: str,
                    head_dim: int = 0, router_score: str = "softmax", latent: int = 0,
                    latent_row: int = 0, itemsize: int = 2) -> "FusedKernels":
        """These kernels, or a copy with the pieces a model exceeds left to the generic
        array code (the reason kept for describe()): the router kernel is the softmax
        router and holds at most MAX_ROUTER_EXPERTS experts per token in registers, the q/k
        norm + RoPE kernel a row's cos/sin (rotated width ``head_dim`` <= MAX_HEAD_DIM)
        and, per-head norm, at most MAX_HEADS heads' norms in shared memory; MLA's decode
        kernel (``latent`` > 0, rows of ``latent_row`` numbers of ``itemsize`` bytes) at
        most MLA_MAX_LATENT latent columns per lane's registers and its block in shared
        memory."""
        off = {}
        if router_score != "softmax":
            off["router_scores"] = (f"router: generic array code ({router_score} scores "
                                    "with a selection bias and expert groups)")
        if n_experts > MAX_ROUTER_EXPERTS:
            off["router"] = (f"router: generic array code ({n_experts} experts; the fused "
                             f"router holds at most {MAX_ROUTER_EXPERTS})")
        if not latent:
            off["mla_decode"] = "no latent attention"
        elif latent > MLA_MAX_LATENT or mla_shared_bytes(latent_row, itemsize) > \
                self.shared_limit:
            off["mla_decode"] = (f"MLA decode: generic array code (latent {latent}, rows of "
                                 f"{latent_row}; the kernel holds at most {MLA_MAX_LATENT})")
        if head_dim > MAX_HEAD_DIM:
            off["qk_rope"] = (f"q/k norm and RoPE: generic array code (head dim {head_dim}; "
                              f"the fused rotation takes at most {MAX_HEAD_DIM})")
        elif qk_norm == "head" and max(heads, kv_heads) > MAX_HEADS:
            off["qk_rope"] = (f"q/k norm and RoPE: generic array code ({max(heads, kv_heads)} "
                              f"heads per rank; the fused per-head norm takes at most "
                              f"{MAX_HEADS})")
        if off == self.rowwise_off:
            return self
        fitted = copy.copy(self)
        fitted.rowwise_off = off
        return fitted

    def describe(self) -> str:
        if self.attention_off is None:
            tiles = ("64/128-query tiles by sequence length" if self.attention_tile is None
                     else f"{self.attention_tile}-query tiles ({ATTENTION_TILE_ENV})")
            attention = (f"flash attention (bf16 on tensor cores, {tiles}; float32 on FMA; "
                         f"even head dims <= {PADDED_HEAD_DIMS[-1]}; grouped-query K/V "
                         "heads)")
        else:
            attention = f"attention: generic array code ({self.attention_off})"
        softmax = self.fuses("router") and self.fuses("router_scores")
        rowwise = ", ".join(["RMSNorm with the residual add", "projection biases"]
                            + [what for piece, what in (
                                ("qk_rope", "q/k norm + RoPE"),
                                ("mla_decode", "MLA decode over the latent cache"))
                               if self.fuses(piece)]
                            + (["router softmax/top-k and expert order"] if softmax else
                               ["expert order"] if self.fuses("router") else []))
        off = "".join(f"; {reason}" for piece, reason in self.rowwise_off.items()
                      if piece != "mla_decode" or reason.startswith("MLA"))
        return (f"fused CUDA kernels for sm_{self.arch}: {attention}, expert FFN (cuBLAS + "
                f"in-place GELU or SwiGLU), permutation, {rowwise}{off}")

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
        lengths, so the last SCHEDULES_KEPT schedules are kept: two small host->device
        copies per pass, also with two passes in flight taking turns."""
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (
            q_starts_host, q_lengths_host, k_starts_host, k_lengths_host)]
        key = (heads, self.n_sm, block_m, *(a.tobytes() for a in arrays))
        kept = self._schedules.pop(key, None)
        if kept is None:
            schedule = attention_schedule(*arrays, heads=heads, n_sm=self.n_sm,
                                          block_m=block_m)
            kept = (schedule, self.cp.asarray(schedule.tiles), self.cp.asarray(schedule.combine))
            while len(self._schedules) >= SCHEDULES_KEPT:
                self._schedules.pop(next(iter(self._schedules)))      # the oldest
        self._schedules[key] = kept                                   # the newest last
        self._schedule = kept
        return kept

    def attention(self, q, q_starts_host, q_lengths_host, k, v, k_starts_host, k_lengths_host,
                  scale: float, out=None, tile_rows: int | None = None):
        """Causal attention of packed queries against packed (or cached) keys, as
        model.causal_attention. q: [Tq, h, D]; k: [Tk, hk, D], v: [Tk, hk, Dv] with hk
        dividing h (query head j reads K/V head j // (h/hk): grouped-query attention; hk = h:
        multi-head) and Dv the value width (D, or MLA's own), C-contiguous, bf16 or float32
        (all the same); ``*_host``: int64 [b]. Returns [Tq, h*Dv] in q's dtype; rows of no
        sequence are left unwritten, as in the generic code. ``out`` (optional, [Tq, h*Dv]
        C-contiguous, 4-byte aligned) receives the result instead of a new array.
        ``tile_rows`` (64 or 128) forces the tile height, which is otherwise
        $SPMD_MOE_ATTENTION_TILE or the schedule's choice by sequence length (bf16 only:
        float32 and unaligned inputs always run 64-row tiles)."""
        assert self.attention_off is None, self.attention_off
        cp = self.cp
        n_q, heads, head_dim = q.shape
        kv_heads = k.shape[1] if k.ndim == 3 else 0
        assert k.ndim == 3 and k.shape[2] == head_dim and v.ndim == 3 and \
            v.shape[:2] == k.shape[:2], (q.shape, k.shape, v.shape)
        v_dim = v.shape[2]
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
                                    (q.data.ptr, k.data.ptr, v.data.ptr), v_dim)

        out = _output(cp, out, (n_q, heads * v_dim), q.dtype)              # [Tq, h*Dv]
        assert out.data.ptr % 4 == 0, "output rows are stored in 4-byte pairs"
        schedule, tiles, combine = self._attention_schedule(
            q_starts_host, q_lengths_host, k_starts_host, k_lengths_host, heads,
            variant.block_m)
        if schedule.n_tiles == 0:
            return out
        assert schedule.n_tiles * heads < 2**31
        # Split tiles write normalised partials [slot, h, BM, Dv] and their log2-sum-exp.
        slots = max(schedule.n_slots, 1)
        part_o = cp.empty((slots, heads, variant.block_m, v_dim), dtype=F32)
        part_lse = cp.empty((slots, heads, variant.block_m), dtype=F32)
        kernel = self._function(self.attention_module, variant.kernel, variant.shared_bytes)
        kernel((schedule.n_tiles * heads,), (variant.threads,),
               (q, k, v, out, part_o, part_lse, tiles, np.int32(schedule.n_tiles),
                np.int32(heads), np.int32(kv_heads), np.int32(head_dim), np.int32(v_dim),
                np.float32(scale * LOG2E)),
               shared_mem=variant.shared_bytes)
        if len(schedule.combine):
            merge = self._function(self.attention_module, variant.combine_kernel)
            merge((len(schedule.combine) * heads,), (COMBINE_THREADS,),
                  (part_o, part_lse, combine, out, np.int32(heads), np.int32(v_dim),
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

    def _gemm(self, a, b, out) -> None:
        """out [M, N] = a @ b with float32 accumulation, rounded once to out's dtype: a
        float32 GEMM for float32 operands, the backend's cublasGemmEx for bf16 ones (never
        cupy.matmul, whose bf16 path is not that call)."""
        if a.dtype == F32:
            self.cp.matmul(a, b, out=out)
        else:
            self.gemm(a, b, out)

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
                self._gemm(x[r0:r1], w1, hidden)
                self.gelu_(hidden)
            else:
                gate, up = gate_buffer[:r1 - r0], up_buffer[:r1 - r0]       # float32 [rows, F]
                self._gemm(x[r0:r1], w1, gate)
                self._gemm(x[r0:r1], w3, up)
                self.swiglu(gate, up, hidden)
            self._gemm(hidden, w2, out[r0:r1])
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

    # --- row-wise kernels (rowwise.cu) ---------------------------------------------------

    def _rows(self, x, name: str):
        """x as a C-contiguous array: copied when a strided view comes in (the engine's
        arrays are contiguous; ``name`` says which argument, for the assertion)."""
        assert x.dtype.itemsize in (2, 4), (name, x.dtype)
        return x if x.flags.c_contiguous else self.cp.ascontiguousarray(x)

    def rms_norm(self, x, gain, eps: float, out=None):
        """model.rms_norm: x [..., d] (bf16 or float32), gain [d] of the same dtype ->
        ``x / sqrt(mean(x^2) + eps) * gain`` over the last axis in float32, stored in x's
        dtype, one launch. ``out`` (optional, x's shape) receives it."""
        name = _dtype_name(x.dtype)
        x, gain = self._rows(x, "x"), self._rows(gain, "gain")
        d = x.shape[-1]
        assert gain.shape == (d,) and gain.dtype == x.dtype, (x.shape, gain.shape, gain.dtype)
        out = _output(self.cp, out, x.shape, x.dtype)
        n_rows = x.size // d if d else 0
        if n_rows:
            kernel = self._function(self.rowwise_module,
                                    "rms_norm_bf16" if name == "bfloat16" else "rms_norm_f32")
            kernel((row_grid(n_rows, 1, self.n_sm),), (ROW_THREADS,),
                   (x, gain, out, np.int64(n_rows), np.int32(d), np.float32(eps)))
        return out

    def add_rms_norm(self, x, y, gain, eps: float):
        """model.add_rms_norm: x, y [T, d] of one dtype, gain [d] -> ``(h, rms_norm(h))``
        with ``h = x + y`` in float32 stored in that dtype, the norm taken of the stored h;
        one launch."""
        name = _dtype_name(x.dtype)
        x, y, gain = self._rows(x, "x"), self._rows(y, "y"), self._rows(gain, "gain")
        assert x.ndim == 2 and y.shape == x.shape and x.dtype == y.dtype == gain.dtype \
            and gain.shape == (x.shape[1],), (x.shape, y.shape, gain.shape, y.dtype)
        n_rows, d = x.shape
        h = _output(self.cp, None, x.shape, x.dtype)                         # [T, d]
        out = _output(self.cp, None, x.shape, x.dtype)                       # [T, d]
        if n_rows and d:
            kernel = self._function(self.rowwise_module, "add_rms_norm_bf16"
                                    if name == "bfloat16" else "add_rms_norm_f32")
            kernel((row_grid(n_rows, 1, self.n_sm),), (ROW_THREADS,),
                   (x, y, gain, h, out, np.int64(n_rows), np.int32(d), np.float32(eps)))
        return h, out

    def residual_add(self, h, moe):
        """The layer's last residual: h [T, d] (bf16 or float32), moe float32 [T, d] ->
        ``h + moe`` added in float32, stored in h's dtype (bit for bit the generic
        ``store(h.astype(float32) + moe)``); one launch."""
        name = _dtype_name(h.dtype)
        h, moe = self._rows(h, "h"), self._rows(moe, "moe")
        assert moe.shape == h.shape and moe.dtype == F32, (h.shape, moe.shape, moe.dtype)
        out = _output(self.cp, None, h.shape, h.dtype)                       # [T, d]
        if h.size:
            self._function(self.rowwise_module, "residual_add_"
                           + ("bf16" if name == "bfloat16" else "f32"))(
                (self._elementwise_blocks(h.size, 1),), (ROW_THREADS,),
                (h, moe, out, np.int64(h.size)))
        return out

    def qk_norm_rope(self, kind: str, q, k, q_gain, k_gain, eps: float, q_width: int,
                     kv_width: int, summed, positions, inv_freq, scale: float = 1.0,
                     interleaved: bool = False):
        """model.qk_norm_rope in one launch, q and k rewritten in place and returned.

        q [T, h, D], k [T, hk, D] (one dtype, C-contiguous); ``kind`` as model.qk_norm
        (``full`` with ``summed``, the TP group's float32 [T, 2] square sums, runs the
        ``summed`` variant); gains of q's dtype; ``positions`` int32 [T], ``inv_freq``
        float64 [D/2], ``scale`` (cos and sin times it) and ``interleaved`` (pairs (2j,
        2j + 1), not (j, j + D/2)): the rotation (angles computed in the kernel, in float64
        as model.rope_tables).
        """
        name = _dtype_name(q.dtype)
        n, heads, head_dim = q.shape
        kv_heads = k.shape[1]
        assert k.shape == (n, kv_heads, head_dim) and k.dtype == q.dtype, (q.shape, k.shape)
        assert q.flags.c_contiguous and k.flags.c_contiguous, "q, k are rewritten in place"
        assert head_dim % 2 == 0 and head_dim <= MAX_HEAD_DIM and positions.shape == (n,) \
            and positions.dtype == np.int32, (head_dim, positions.shape, positions.dtype)
        assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == np.float64, \
            (inv_freq.shape, inv_freq.dtype)
        positions = self._rows(positions, "positions")
        inv_freq = self.cp.ascontiguousarray(inv_freq)
        variant = "summed" if kind == "full" and summed is not None else kind
        assert variant in ("none", "head", "full", "summed"), kind
        assert variant != "head" or max(heads, kv_heads) <= MAX_HEADS, (heads, MAX_HEADS)
        if variant == "none":
            q_gain = k_gain = q                     # unread
        else:
            q_gain, k_gain = self._rows(q_gain, "q_gain"), self._rows(k_gain, "k_gain")
            assert q_gain.dtype == k_gain.dtype == q.dtype, (q_gain.dtype, q.dtype)
        if variant == "summed":
            summed = self._rows(summed, "summed")
            assert summed.shape == (n, 2) and summed.dtype == F32, (summed.shape, summed.dtype)
        else:
            summed = positions                      # unread
        if n:
            kernel = self._function(self.rowwise_module, f"rope_{variant}_"
                                    + ("bf16" if name == "bfloat16" else "f32"))
            kernel((row_grid(n, 1, self.n_sm), 2), (ROW_THREADS,),
                   (q, k, q_gain, k_gain, positions, summed, np.int64(n), np.int32(heads),
                    np.int32(kv_heads), np.int32(head_dim), np.float32(q_width),
                    np.float32(kv_width), np.float32(eps), inv_freq, np.float64(scale),
                    np.int32(bool(interleaved))))
        return q, k

    def bias_add(self, y, bias, out_dtype):
        """blocks.linear's bias: y float32 [T, w] (a GEMM's accumulator), bias float32 [w]
        -> ``y + bias`` rounded once to ``out_dtype`` (bf16, or float32 in place); one
        launch."""
        name = _dtype_name(np.dtype(out_dtype))
        assert y.dtype == bias.dtype == F32 and y.ndim == 2 and bias.shape == (y.shape[1],), \
            (y.dtype, bias.dtype, y.shape, bias.shape)
        y, bias = self._rows(y, "y"), self._rows(bias, "bias")
        out = y if name == "float32" else _output(self.cp, None, y.shape, np.dtype(out_dtype))
        if y.size:
            self._function(self.rowwise_module, "bias_add_"
                           + ("bf16" if name == "bfloat16" else "f32"))(
                (self._elementwise_blocks(y.size, 1),), (ROW_THREADS,),
                (y, bias, out, np.int64(y.size), np.int32(y.shape[1])))
        return out

    def route(self, logits, top_k: int, renormalize: bool):
        """router.route after its GEMM: logits float32 [T, E] -> ``experts`` int32 [T, k]
        (best first, ties to the lower expert) and ``weights`` float32 [T, k] (the
        winners' softmax probabilities, divided by their sum when ``renormalize``); a token
        with non-finite logits gets the sentinel expert E and weight 0, as on the generic
        path. One launch, E <= MAX_ROUTER_EXPERTS."""
        cp = self.cp
        n, n_experts = logits.shape
        assert logits.dtype == F32 and 1 <= top_k <= n_experts <= MAX_ROUTER_EXPERTS, \
            (logits.dtype, top_k, n_experts)
        logits = self._rows(logits, "logits")
        experts = _output(cp, None, (n, top_k), np.dtype(np.int32))              # [T, k]
        weights = _output(cp, None, (n, top_k), F32)                              # [T, k]
        if n:
            per_block = ROUTER_THREADS // 32
            self._function(self.rowwise_module, "router_topk")(
                (row_grid(n, per_block, self.n_sm),), (ROUTER_THREADS,),
                (logits, experts, weights, np.int64(n), np.int32(n_experts),
                 np.int32(top_k), np.int32(bool(renormalize))))
        return experts, weights

    def mla_decode(self, q, rows, k_starts_host, k_lengths_host, latent: int, scale: float,
                   out=None):
        """mla.absorbed's attention over the latent: q [b, h, W] (one query per sequence,
        its latent part then its rope part), rows [n, W] (the latent cache: each token's
        latent, then its rope key), sequence i's keys at rows ``k_starts[i]`` (int64 [b])
        onwards, ``k_lengths[i]`` of them, all visible; values: the rows' first ``latent``
        columns. -> [b, h*latent] in q's dtype. One launch (split-K: two, the combine's).
        ``out`` (optional, [b, h*latent]) receives the result."""
        cp = self.cp
        n, heads, width = q.shape
        assert rows.ndim == 2 and rows.shape[1] == width and rows.dtype == q.dtype, \
            (q.shape, rows.shape, rows.dtype)
        assert 0 < latent <= min(width, MLA_MAX_LATENT), (latent, width)
        name = _dtype_name(q.dtype)
        q, rows = self._rows(q, "q"), self._rows(rows, "rows")
        out = _output(cp, out, (n, heads * latent), q.dtype)               # [b, h*c]
        if n == 0:
            return out
        schedule = mla_schedule(k_starts_host, k_lengths_host, heads, self.n_sm)
        slots = max(schedule.n_slots, 1)
        part_o = cp.empty((slots, heads, 1, latent), dtype=F32)
        part_lse = cp.empty((slots, heads, 1), dtype=F32)
        shared = mla_shared_bytes(width, q.dtype.itemsize)
        short = "bf16" if name == "bfloat16" else "f32"
        kernel = self._function(self.mla_module, f"mla_decode_{short}", shared)
        kernel((len(schedule.tiles), -(-heads // MLA_HEADS)), (MLA_THREADS,),
               (q, rows, out, part_o, part_lse, cp.asarray(schedule.tiles), np.int32(heads),
                np.int32(width), np.int32(latent), np.float32(scale * LOG2E)),
               shared_mem=shared)
        if len(schedule.combine):
            merge = self._function(self.attention_module, f"attention_combine_{short}")
            merge((len(schedule.combine) * heads,), (COMBINE_THREADS,),
                  (part_o, part_lse, cp.asarray(schedule.combine), out, np.int32(heads),
                   np.int32(latent), np.int32(1)))
        return out

    def expert_order(self, top_experts, n_experts: int):
        """Dispatcher.sort's sort: top_experts int32 [T, k] (experts 0..E-1, or the
        router's sentinel E) -> ``order`` int64 [R] (pair indices t*k + j stably sorted by
        expert, the sentinel's last) and ``counts`` int64 [E + 1] (the last: sentinel
        pairs) on the device; one launch (block e writes expert e's run)."""
        cp = self.cp
        assert top_experts.dtype == np.int32, top_experts.dtype
        flat = self._rows(top_experts, "experts").reshape(-1)                     # [R]
        n_pairs, bins = flat.shape[0], n_experts + 1
        order = _output(cp, None, (n_pairs,), np.dtype(np.int64))                 # [R]
        counts = _output(cp, None, (bins,), np.dtype(np.int64))                   # [E + 1]
        self._function(self.rowwise_module, "expert_order")(
            (bins,), (ORDER_THREADS,),
            (flat, order, counts, np.int64(n_pairs), np.int32(bins)))
        return order, counts
