"""Compute time of one rank's layer, embedding and LM head in the performance model.

Each GEMM is a roofline, ``max(flops / rate, bytes / hbm)`` (bandwidth-bound at decode,
compute-bound at prefill), FLOPs from costs.layer_flops; elementwise work (norms, RoPE,
residuals, un-fused GELU) as passes over float32 arrays at ``hbm``; plus ``op_us`` per
array operation or kernel launch, counted per phase in :data:`OPS` (NumPy) and
:func:`gpu_layer_ops` (the GPU path, checked against a count by test_launch_count).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..core.config import RunConfig
from ..core.costs import layer_flops
from ..core.topology import Grid
from .cluster import Rates


# Bytes one elementwise pass over a float32 array moves per element (two reads, a write).
PASS_BYTES = 12


# Un-fused elementwise passes per element of [t, d] (or [t, w], [t, E], [R, f]) arrays,
# counted in model/blocks.py, moe/router.py, moe/layer.py and backend.gelu's NumPy form.
PASSES = {
    "norm": 5,            # astype, x*x, mean, *inv, *gain
    "rope": 9,            # per q and k: concat of negated halves, 2 products, a sum
    "residual": 3,        # astype, add, store
    "softmax": 5,         # max, subtract, exp, sum, divide over [t, E]
    "topk": 3,            # argmax, gather, mask per k over [t, E]
    "unpermute": 3,       # per k: astype, weight, accumulate over [t, d]
    "gelu_numpy": 40,     # erfc in float64: ~30 float64 passes ~ 40 float32-pass equivalents
}


# Array operations per phase (each costs ``op_us``) on the NumPy path (the generic array
# code; attention runs per sequence there), and the communication phases' calls on both.
# (The residual add after attention runs in the router phase, with the MoE norm it feeds.)
OPS = {"attention": 37, "attention_per_sequence": 14, "kv_cache": 4, "router": 30,
       "permute": 8,
       "count_exchange": 2, "dispatch": 2, "experts_per_expert": 8, "combine": 2,
       "unpermute": 10, "residual": 3, "embed": 1, "lm_head": 12, "stage_send": 1}


# The GPU path (CuPy with the fused kernels): calls into the device (kernel launches,
# cuBLAS GEMMs, host<->device copies) per phase of one layer, counted on the engine by
# tests/test_launch_count.py (each family, prefill chunk and decode step), not estimated.
GPU_OPS = {
    "attention": 7,       # RMSNorm, q/k/v/o GEMMs (4), q/k norm + RoPE, flash attention
    "kv_cache": 3,        # the new rows' cache index uploaded, K and V scattered
    "router": 3,          # residual add + RMSNorm, router GEMM, softmax/top-k
    "permute": 3,         # expert order, its counts to the host, the send rows' gather
    "regroup": 2,         # several local experts: index upload, regroup gather (dispatch)
    "experts_gelu": 3,    # per local expert: GEMM, GELU, GEMM
    "experts_swiglu": 4,  # per local expert: two GEMMs, SwiGLU, GEMM
    "unpermute": 2,       # inverse permutation, weighted combine
    "unregroup": 1,       # several local experts: the rows scattered back (combine)
    "residual": 1,        # residual add
    "embed": 2,           # token ids uploaded, embedding rows gathered
    "lm_head": 4,         # last rows' index uploaded, gathered, final RMSNorm, GEMM
    "pass": 3,            # per stage pass: positions uploaded, attention schedule (2)
}


# Host waits for the device per layer on the GPU path, by phase and transport: the expert
# counts' copy (an event, waited at the count exchange: under TP, where none is exchanged,
# in permute) on every transport, and one fence (an event recorded and waited) per exchange
# that hands MPI device or staging memory on the MPI transports; no device or stream
# synchronisation anywhere. Counted on the engine by tests/test_launch_count.py. The cluster
# model (perfmodel) charges the MPI transports' (mpi-cuda on a CUDA-aware cluster).
GPU_WAITS = {
    "nccl": {"count_exchange": 1},
    "mpi-cuda": {"count_exchange": 1, "dispatch": 1, "combine": 1},
    "mpi-host": {"count_exchange": 1, "dispatch": 1, "combine": 1},
}
MODEL_TRANSPORT = "mpi-cuda"


def gpu_layer_waits(transport: str, tp: int = 1) -> dict[str, int]:
    """Host waits per phase of one layer on the GPU path (:data:`GPU_WAITS`); under TP the
    counts' wait is in permute, and the MPI transports fence the two allreduces."""
    if tp == 1:
        return dict(GPU_WAITS[transport])
    mpi = transport != "nccl"
    return {"permute": 1, **({"attn_allreduce": 1, "combine": 1} if mpi else {})}


def gpu_layer_ops(local_experts: int, swiglu: bool, cached: bool,
                  with_rows: int | None = None, tp: int = 1) -> dict[str, int]:
    """Device calls per compute phase of one layer on the GPU path (:data:`GPU_OPS`):
    ``local_experts`` experts on the rank, ``with_rows`` of them getting rows (default:
    all), ``cached``: the layer writes (and attends through) a KV cache (a chunked
    prefill or a decode step). Under TP (``tp`` > 1) rows stay put: no regrouping. (The
    count checks the expert-parallel path; TP's extra roundings of its allreduced partials
    are charged to the communication phases' calls.)"""
    several = local_experts > 1 and tp == 1
    with_rows = local_experts if with_rows is None else with_rows
    return {"attention": GPU_OPS["attention"] + (GPU_OPS["kv_cache"] if cached else 0),
            "router": GPU_OPS["router"],
            "permute": GPU_OPS["permute"] + (GPU_OPS["regroup"] if several else 0),
            "experts": GPU_OPS["experts_swiglu" if swiglu else "experts_gelu"] * with_rows,
            "unpermute": GPU_OPS["unpermute"] + (GPU_OPS["unregroup"] if several else 0),
            "residual": GPU_OPS["residual"]}


def gemm_time(m: float, k: int, n: int, rate: float, hbm: float, in_bytes: int,
              weight_bytes: int, out_bytes: int) -> float:
    """[m, k] x [k, n]: compute- or memory-bound, whichever is slower."""
    if m <= 0:
        return 0.0
    flops = 2.0 * m * k * n
    moved = m * k * in_bytes + k * n * weight_bytes + m * n * out_bytes
    return max(flops / rate, moved / hbm)


@dataclass(frozen=True)
class RankShape:
    """What one rank of a layout computes per layer, independent of the batch."""

    d: int
    width: int          # heads * Dh on this rank
    heads: int
    head_dim: int
    ff: int             # F slice
    experts: int        # E
    local_experts: int  # El (all E under TP)
    top_k: int
    vocab: int
    item: int           # storage bytes
    param_item: int     # weight bytes as the backend keeps them
    tp: int
    numpy: bool
    swiglu: bool = False   # gated (SwiGLU) experts: a third GEMM and more launches
    # The attention's projections per new token other than the output one, as (k, n)
    # GEMM shapes, and the output projection's input width (h * Dv).
    proj: tuple = ()
    out_width: int = 0
    # MLA: the latent's expansion per key, (c, h * (nope + Dv)) (None: multi-head).
    expand: tuple | None = None
    cache_token_bytes: int = 0   # KV cache bytes per token and layer a decode step reads
    decode_key_flops: int = 0    # attention FLOPs per (query, key) at decode
    shared_ff: int = 0           # the shared expert's F slice


@functools.lru_cache(maxsize=4096)
def rank_shape(config: RunConfig, grid: Grid, backend: str) -> RankShape:
    model = config.model
    item = 2 if model.dtype == "bfloat16" else 4
    d, heads, dh, dv = model.d_model, len(grid.heads), model.head_dim, model.v_dim
    width, kv_width = heads * dh, len(grid.kv_heads) * dh
    if model.attention == "mla":
        rank, latent = model.q_lora_rank, model.kv_lora_rank
        proj = (((d, rank), (rank, width)) if rank else ((d, width),)) + (
            (d, latent + model.rope_width),)
        expand = (latent, heads * (model.nope_dim + dv))
        # The absorbed form: a score over the latent and rope key, a value of the latent.
        cache, per_key = model.cache_width * item, 2 * heads * (model.cache_width + latent)
    else:
        proj, expand = ((d, width), (d, kv_width), (d, kv_width)), None
        cache, per_key = 2 * kv_width * item, 2 * (width + heads * dv)
    return RankShape(d, width, heads, dh, len(grid.ff_columns), model.n_experts,
                     len(grid.experts), model.top_k, model.vocab_size, item,
                     4 if backend == "numpy" else item, grid.layout.tp, backend == "numpy",
                     model.activation == "swiglu", proj, heads * dv, expand, cache, per_key,
                     len(grid.tp_slice(model.d_shared)))


def launched(device: float, ops: float, rates: Rates, shape: "RankShape") -> float:
    """A phase's time from its device work (s) and its array operations: on NumPy each call
    does its work before returning, so the two add; on the GPU launches are asynchronous
    (the host queues the next kernels while the device runs), so the slower of the host's
    launching and the device's work sets the pace."""
    cost = ops * rates.op_us * 1e-6
    return device + cost if shape.numpy else max(device, cost)


def layer_compute(config: RunConfig, shape: RankShape, rates: Rates, lengths: np.ndarray,
                  routed_rows: float, context: np.ndarray | None = None,
                  starts: np.ndarray | None = None) -> dict[str, float]:
    """Seconds of computation per phase for one layer on one rank.

    ``lengths``: new tokens of each of the rank's sequences (or chunks) in this micro-batch;
    ``routed_rows``: rows its experts process; ``context``: for a decode step, the keys each
    sequence attends to (None: a prefill); ``starts``: for a chunked prefill, the position
    of each chunk's first token (its queries attend to ``start + length`` keys, the earlier
    ones read from the KV cache).
    """
    s, p, d, w, f = shape.item, shape.param_item, shape.d, shape.width, shape.ff
    t = int(np.sum(lengths))
    hbm = rates.hbm
    k = shape.top_k
    flops = layer_flops(config.model, t, lengths, shape.heads, routed_rows, f, starts=starts,
                        shared_width=shape.shared_ff)
    passes = lambda n_passes, elements: n_passes * elements * PASS_BYTES / hbm  # noqa: E731
    run = lambda device, ops: launched(device, ops, rates, shape)  # noqa: E731

    # Attention: the projections (MLA: its low-rank ones, and the latent's expansion of
    # every key at prefill or the absorption into the queries at decode); the core; norm,
    # RoPE, residual add.
    partial = 4 if shape.tp > 1 else s        # TP: float32 partial sums for the allreduce
    proj = sum(gemm_time(t, k_in, n_out, rates.gemm, hbm, s, p, s)
               for k_in, n_out in shape.proj) + \
        gemm_time(t, shape.out_width, d, rates.gemm, hbm, s, p, partial)
    cached = context is not None or starts is not None
    if context is None:
        core_flops = flops["attention_core"]
        keys = t + (float(np.sum(starts)) if starts is not None else 0.0)
        core_bytes = 2 * t * w * s + 2 * keys * w * s     # q, o; k, v (cached or new) once
        if shape.expand is not None:
            proj += gemm_time(keys, *shape.expand, rates.gemm, hbm, s, p, s)
    else:
        keys = float(np.sum(context))
        core_flops = shape.decode_key_flops * keys    # one query per sequence
        core_bytes = keys * shape.cache_token_bytes + 2 * t * w * s
        if shape.expand is not None:
            proj += gemm_time(t, *shape.expand, rates.gemm, hbm, s, p, s)
    core = max(core_flops / rates.attention, core_bytes / hbm) if t else 0.0
    n_seqs = int(np.count_nonzero(lengths))
    if shape.numpy:
        ops = {"attention": OPS["attention"] + (OPS["kv_cache"] if cached else 0)
               + OPS["attention_per_sequence"] * n_seqs,
               "router": OPS["router"], "permute": OPS["permute"],
               "experts": OPS["experts_per_expert"] * shape.local_experts,
               "unpermute": OPS["unpermute"], "residual": OPS["residual"]}
        # The generic array code's float32 passes (PASSES).
        rowwise = {"attention": passes(PASSES["norm"], t * d) + passes(PASSES["rope"], t * w),
                   "router": passes(PASSES["norm"] + PASSES["residual"], t * d)
                   + passes(PASSES["softmax"] + PASSES["topk"] * k, t * shape.experts),
                   "unpermute": 2 * t * k * d * s / hbm + passes(PASSES["unpermute"] * k, t * d),
                   "residual": passes(PASSES["residual"], t * d)}
    else:
        ops = gpu_layer_ops(shape.local_experts, shape.swiglu, cached, tp=shape.tp)
        # The fused kernels' own traffic (rowwise.cu, permute.cu), bytes per element:
        # RMSNorm reads its rows twice and writes once (3 s); q/k norm + RoPE reads q and k
        # (twice with a norm) and rewrites them in place (<= 3 s over q's width, k's
        # counted as wide); the residual add + MoE norm reads x and y twice and writes h
        # and the normed rows (6 s); the router reads its float32 logits once; the
        # weighted combine reads k rows and writes float32 (k s + 4); the last residual
        # reads h and the float32 combine and writes (2 s + 4).
        rowwise = {"attention": (3 * s * t * d + 3 * s * t * w) / hbm,
                   "router": (6 * s * t * d + 4 * t * shape.experts) / hbm,
                   "unpermute": t * d * (k * s + 4) / hbm,
                   "residual": t * d * (2 * s + 4) / hbm}
    attention = run(proj + core + rowwise["attention"]
                    + (2 * t * w * s / hbm if cached else 0), ops["attention"])

    router = run(gemm_time(t, d, shape.experts, rates.gemm, hbm, s, p, 4) + rowwise["router"],
                 ops["router"])
    permute = run(2 * t * k * d * s / hbm, ops["permute"])

    # Experts: El experts, routed_rows rows between them, two GEMMs and a GELU each; and a
    # shared expert's three GEMMs over every token.
    rows = routed_rows
    expert_bytes = (shape.local_experts * 2 * d * f * p
                    + rows * (2 * d * s + 2 * f * s))
    experts = max(flops["experts"] / rates.expert, expert_bytes / hbm) if rows else 0.0
    if shape.shared_ff and t:
        experts += max(flops["shared_experts"] / rates.expert,
                       (3 * d * shape.shared_ff * p + t * (2 * d + 3 * shape.shared_ff) * s)
                       / hbm)
    if shape.numpy and not rates.expert_tflops:
        experts += passes(PASSES["gelu_numpy"], rows * f)
    experts = run(experts, ops["experts"])

    unpermute = run(rowwise["unpermute"], ops["unpermute"])
    residual = run(rowwise["residual"], ops["residual"])
    return {"attention": attention, "router": router, "permute": permute,
            "experts": experts, "unpermute": unpermute, "residual": residual}


def embed_time(shape: RankShape, rates: Rates, tokens: int) -> float:
    ops = OPS["embed"] if shape.numpy else GPU_OPS["embed"]
    return 2 * tokens * shape.d * shape.item / rates.hbm + rates.op_us * 1e-6 * ops


def lm_head_time(shape: RankShape, rates: Rates, sequences: int) -> float:
    if sequences == 0:
        return 0.0
    ops = OPS["lm_head"] if shape.numpy else GPU_OPS["lm_head"]
    return gemm_time(sequences, shape.d, shape.vocab, rates.gemm, rates.hbm, shape.item,
                     shape.param_item, 4) + rates.op_us * 1e-6 * ops
