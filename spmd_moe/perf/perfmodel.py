"""``spmd-moe plan --predict``: a performance model of this engine on a GPU cluster.

Inputs: the model and workload (config), a layout, a cluster (GPUs per node; NVLink and
InfiniBand bandwidth and latency per GPU; :class:`Cluster`) and kernel rates (GEMM,
attention, expert FFN, memory bandwidth, per-operation overhead; :class:`Rates`, defaults
from an H100 until ``--calibration`` replaces them). Output: per-phase time of a layer,
per-stage time, the pipeline's makespan and bubble, tokens/s, and "ms/token" in its three
readings. docs/CLUSTER.md derives the equations; in short:

- compute, per rank, layer and micro-batch: each GEMM ``max(flops / rate, bytes / hbm)``
  (a roofline: bandwidth-bound at decode, compute-bound at prefill), FLOPs from
  :func:`costs.layer_flops`; elementwise work (norms, RoPE, residuals, un-fused GELU) as
  passes over float32 arrays at ``hbm``; plus ``op_us`` per array operation.
- communication, from the bytes :func:`costs.rank_cost` says each rank sends, spread over
  peers as balanced routing spreads them: Alltoallv (dispatch, combine, count exchange)
  ``sum_peers alpha + max(intra bytes / B_nvlink, inter bytes / B_ib)``, sends and receives
  alike (ranks placed ``r // gpus_per_node``, as bin/launch maps them); ring allreduce
  ``2 (P-1) alpha + bytes_sent / B`` with B the slowest link of the ring; stage to stage
  ``alpha + bytes / B``.
- bulk-synchronous layer: a phase lasts as long as the slowest rank of the stage needs.
- pipeline: stage s starts micro-batch m when it has finished m-1 and m has arrived from
  s-1 (``C[s][m] = max(C[s-1][m] + hop, C[s][m-1]) + tau[s][m]``); the makespan is the
  last stage's last finish; the bubble is the share of it the busiest stage sits idle.
- decode step: the same pipeline with one token per live sequence, attention reading a KV
  cache of ``seq_len + new_tokens/2`` positions per sequence (the mean over the steps).

Nothing overlaps communication with computation, because the engine does not. Routing is
balanced unless ``--routing-imbalance`` says how much busier the busiest expert rank is
(:func:`measured_imbalance` reads it off a run's ``expert_counts``). ``--against REPORT``
sets a prediction beside a measured run; calibrate.py's ``measure_cpu_rates`` and
``measure_mpi_links`` calibrate the model on a CPU machine (bin/calibrate-local). The
cluster and the kernel rates, the model's inputs, are cluster.py's.

Notation: t tokens of a micro-batch on one rank, T the stage's tokens of it, d width,
w = heads*Dh this rank's attention width, f this rank's F slice, E experts, El local
experts, k top-k, s storage bytes, p parameter bytes, P ranks in a stage, M micro-batches.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from ..core.chunks import MicroBatch, overlap_enabled, prefill_schedule, whole_sequences
from .cluster import RATE_KEYS, Cluster, Rates, cluster_to_dict
from ..core.config import Layout, RunConfig
from ..core.costs import GIB, layer_flops, rank_cost
from ..core.errors import ConfigError, LayoutError
from ..core.topology import Grid

# --- compute ---------------------------------------------------------------------------

# Bytes one elementwise pass over a float32 array moves per element (two reads, a write).
PASS_BYTES = 12
# Un-fused elementwise passes per element of [t, d] (or [t, w], [t, E], [R, f]) arrays,
# counted in model.py, router.py, moe_layer.py and backend.gelu's NumPy form.
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


@functools.lru_cache(maxsize=4096)
def rank_shape(config: RunConfig, grid: Grid, backend: str) -> RankShape:
    model = config.model
    item = 2 if model.dtype == "bfloat16" else 4
    return RankShape(model.d_model, len(grid.heads) * model.head_dim, len(grid.heads),
                     model.head_dim, len(grid.ff_columns), model.n_experts, len(grid.experts),
                     model.top_k, model.vocab_size, item,
                     4 if backend == "numpy" else item, grid.layout.tp, backend == "numpy",
                     model.activation == "swiglu")


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
    flops = layer_flops(config.model, t, lengths, shape.heads, routed_rows, f, starts=starts)
    passes = lambda n_passes, elements: n_passes * elements * PASS_BYTES / hbm  # noqa: E731
    run = lambda device, ops: launched(device, ops, rates, shape)  # noqa: E731

    # Attention: q, k, v, o projections; the core; norm, RoPE, residual add.
    partial = 4 if shape.tp > 1 else s        # TP: float32 partial sums for the allreduce
    proj = 3 * gemm_time(t, d, w, rates.gemm, hbm, s, p, s) + \
        gemm_time(t, w, d, rates.gemm, hbm, s, p, partial)
    cached = context is not None or starts is not None
    if context is None:
        core_flops = flops["attention_core"]
        keys = t + (float(np.sum(starts)) if starts is not None else 0.0)
        core_bytes = 2 * t * w * s + 2 * keys * w * s     # q, o; k, v (cached or new) once
    else:
        keys = float(np.sum(context))
        core_flops = 4.0 * w * keys                   # q.K and p.V for one query per sequence
        core_bytes = 2 * keys * w * s + 2 * t * w * s
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

    # Experts: El experts, routed_rows rows between them, two GEMMs and a GELU each.
    rows = routed_rows
    expert_bytes = (shape.local_experts * 2 * d * f * p
                    + rows * (2 * d * s + 2 * f * s))
    experts = max(flops["experts"] / rates.expert, expert_bytes / hbm) if rows else 0.0
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


# --- communication ---------------------------------------------------------------------

def alltoallv_time(cluster: Cluster, ranks: list[int], sent: list[float]) -> float:
    """A balanced Alltoallv among world ``ranks``: rank i sends ``sent[i]`` bytes in all,
    split evenly over its P-1 peers. Each rank pays the latency of every peer and moves its
    NVLink and InfiniBand shares (sent and received) at once; the slowest rank sets the
    time."""
    peers = len(ranks)
    if peers < 2:
        return 0.0
    nodes = np.asarray(ranks) // cluster.gpus_per_node
    same = nodes[:, None] == nodes[None, :]                                   # [P, P]
    intra = same & ~np.eye(peers, dtype=bool)
    inter = ~same
    share = np.asarray(sent, dtype=np.float64) / (peers - 1)                  # [P] per peer
    latency = (intra.sum(axis=1) * cluster.intra_latency
               + inter.sum(axis=1) * cluster.inter_latency)
    moving = np.maximum.reduce([share * intra.sum(axis=1) / cluster.intra_bandwidth,
                                intra @ share / cluster.intra_bandwidth,
                                share * inter.sum(axis=1) / cluster.inter_bandwidth,
                                inter @ share / cluster.inter_bandwidth])
    return float((latency + moving).max())


def allreduce_time(cluster: Cluster, ranks: list[int], sent: float) -> float:
    """Ring allreduce in which each rank sends ``sent`` bytes (2 (P-1)/P of the buffer):
    2 (P-1) steps of the ring's slowest link."""
    peers = len(ranks)
    if peers < 2:
        return 0.0
    one_node = len({cluster.node_of(r) for r in ranks}) == 1
    bandwidth, alpha = ((cluster.intra_bandwidth, cluster.intra_latency) if one_node
                        else (cluster.inter_bandwidth, cluster.inter_latency))
    return 2 * (peers - 1) * alpha + sent / bandwidth


def p2p_time(cluster: Cluster, source: int, dest: int, nbytes: float) -> float:
    bandwidth, alpha = cluster.link(source, dest)
    return alpha + nbytes / bandwidth


# --- the prediction --------------------------------------------------------------------

COMPUTE_PHASES = ("attention", "router", "permute", "experts", "unpermute", "residual")
COMM_PHASES = ("attn_allreduce", "count_exchange", "dispatch", "combine")
LAYER_ORDER = ("attention", "attn_allreduce", "router", "permute", "count_exchange",
               "dispatch", "experts", "combine", "unpermute", "residual")


@dataclass
class _StagePass:
    """One stage running one micro-batch: its time and what each rank spent per phase."""

    seconds: float
    per_rank: list[dict[str, float]]     # phase -> seconds, per group rank
    hop: float                           # sending the result to the next stage
    layer: dict[str, float]              # one layer's phases (max over ranks)
    exposed: dict[str, float] = field(default_factory=dict)  # comm phases after overlap
    latency: float | None = None         # start to finish with two in flight
    alone: float | None = None           # start to finish with none beside it

    def through(self, last: bool) -> float:
        """Time from starting this micro-batch to handing it on. One at a time: its
        ``seconds``. Two in flight at one per ``seconds``: each spends two intervals in the
        stage (Little's law), so a pipeline fills at half speed; the stage's last one runs
        alone (its own compute and all its exchanges)."""
        if self.latency is None:
            return self.seconds
        return self.alone if last else self.latency


def _prefill_micro(config: RunConfig, layout: Layout, lengths: np.ndarray, rank: int,
                   backend: str) -> list[MicroBatch]:
    """The engine's prefill micro-batches of ``rank`` (chunks.py)."""
    return prefill_schedule(Grid(layout, config.model, rank), config.workload, lengths,
                            backend).micro_batches


def _decode_micro(config: RunConfig, layout: Layout, lengths: np.ndarray,
                  rank: int) -> list[MicroBatch]:
    """The decode steps' micro-batches of ``rank``: whole sequences, ``micro_batches``
    groups (one per stage by default), as engine.Engine.decode_micro_batches."""
    grid = Grid(layout, config.model, rank)
    count = len(grid.micro_batches(len(lengths), config.workload.micro_batches))
    return whole_sequences(grid.sequences(len(lengths)), lengths, count)


def overlap_applies(config: RunConfig, layout: Layout, micro_batches: int,
                    backend: str = "cupy") -> bool:
    """As engine.Engine.overlaps (overlap.overlap_enabled)."""
    return overlap_enabled(config.workload.overlap, micro_batches, layout.pp, layout.group,
                           backend)


def exposed_comm(layer: dict[str, float], numpy: bool) -> dict[str, float]:
    """A layer's communication phases left exposed when two micro-batches share a stage
    (overlap.py: the older runs first, the newer computes while the older waits), both
    micro-batches taken alike. Per layer a pass starts its count exchange after its
    permutation, its dispatch as soon as the counts are in, its combine after its experts:

    - the count exchange hides under the other's un-permute, residual, attention, router
      and permutation; the combine under the other's experts;
    - the dispatch follows the count exchange with no compute between, and the other
      micro-batch, one exchange behind, reaches its own dispatch with nothing to compute
      either: the older one's dispatch stays exposed, the newer one's hides under the
      older's experts. Half of it is counted exposed;
    - TP baseline: the attention allreduce hides under the other's attention, the combine
      allreduce under the other's experts.

    On NumPy nothing is hidden: MPI progresses only inside MPI calls there (no progress
    thread), and the model has no term for the pokes between compute phases."""
    out = {name: layer[name] for name in COMM_PHASES if name in layer}
    if numpy:
        return out
    front = layer["attention"] + layer["router"] + layer["permute"]
    back = layer["unpermute"] + layer["residual"]
    if "count_exchange" in out:
        out["count_exchange"] = max(0.0, out["count_exchange"] - front - back)
    if "dispatch" in out:
        out["dispatch"] = out["dispatch"] / 2
    if "attn_allreduce" in out:
        out["attn_allreduce"] = max(0.0, out["attn_allreduce"] - layer["attention"])
    if "combine" in out:
        out["combine"] = max(0.0, out["combine"] - layer["experts"])
    return out


def scaled_bytes(costs: list, tokens: list[int], n_layers: int, tp: int,
                 imbalance: float = 1.0) -> list[dict[str, float]]:
    """Bytes each rank of a stage sends per layer for one micro-batch (``tokens[g]``: group
    rank g's new tokens in it), scaled from ``costs`` (:func:`costs.rank_cost` of the whole
    forward): every entry is linear in the rank's tokens, except the expert-parallel
    combine, which is linear in the rows the rank's experts received (the stage's tokens,
    times ``imbalance`` for the busiest rank). ``stage_send`` is the one message per stage
    pass (costs.py spreads it over the stage's layers)."""
    stage_tokens, stage_total = sum(tokens), sum(c.tokens for c in costs)
    out = []
    for g, cost in enumerate(costs):
        own = tokens[g] / cost.tokens if cost.tokens else 0.0
        routed = stage_tokens / stage_total if stage_total else 0.0
        row = {}
        for key, value in cost.send_bytes_per_layer.items():
            if key == "stage_send":
                row[key] = value * n_layers * own
            elif key == "combine" and tp == 1:
                row[key] = value * routed * imbalance
            else:
                row[key] = value * own
        out.append(row)
    return out


def bytes_per_micro_batch(config: RunConfig, layout: Layout, lengths: np.ndarray,
                          backend: str = "cupy") -> list:
    """For every world rank, per micro-batch, the bytes the model moves per layer (balanced
    routing): ``[rank][m] -> {"dispatch" | "combine" | "attn_allreduce" | "stage_send":
    bytes}``. Summed over micro-batches they are :func:`costs.rank_cost`'s."""
    out = []
    for rank in range(layout.world_size):
        grid = Grid(layout, config.model, rank)
        stage = [grid.stage * layout.group + g for g in range(layout.group)]
        costs = [rank_cost(config, Grid(layout, config.model, r), lengths, backend)
                 for r in stage]
        micro = [_prefill_micro(config, layout, lengths, r, backend) for r in stage]
        out.append([scaled_bytes(costs, [mb[m].n_tokens for mb in micro], len(grid.layers),
                                 layout.tp)[grid.group_rank] for m in range(len(micro[0]))])
    return out


def _stage_pass(config: RunConfig, layout: Layout, cluster: Cluster, rates: Rates,
                backend: str, stage: int, micro: list[list[MicroBatch]], m: int,
                costs: list, decode_context: float | None, imbalance: float,
                overlap: bool = False) -> _StagePass:
    """Stage ``stage`` running micro-batch ``m`` (``micro[g][m]``: group rank g's chunks
    or sequences in it). ``imbalance``: routed rows of a stage's busiest expert rank over
    the mean (1: balanced routing); the bulk-synchronous stage runs at its pace.
    ``overlap``: two micro-batches alternate, hiding communication (:func:`exposed_comm`)."""
    group = layout.group
    ranks = [stage * group + g for g in range(group)]
    grids = [Grid(layout, config.model, r) for r in ranks]
    n_layers = len(grids[0].layers)
    new = [np.ones(len(micro[g][m].seqs), dtype=np.int64) if decode_context is not None
           else micro[g][m].lengths for g in range(group)]
    starts = [None if decode_context is not None or not micro[g][m].starts.any()
              else micro[g][m].starts for g in range(group)]
    tokens = [int(x.sum()) for x in new]
    stage_tokens = sum(tokens)
    k = config.model.top_k
    sent = scaled_bytes(costs, tokens, n_layers, layout.tp, imbalance)
    per_rank = []
    for g, grid in enumerate(grids):
        shape = rank_shape(config, grid, backend)
        routed_rows = (tokens[g] * k if layout.tp > 1
                       else stage_tokens * k / layout.ep * imbalance)
        context = None
        if decode_context is not None:
            context = np.full(len(new[g]), decode_context)
        phases = layer_compute(config, shape, rates, new[g], routed_rows, context, starts[g])
        per_rank.append(phases)
    # Communication: the same time for every rank of the stage (collectives).
    comm: dict[str, float] = {}
    if layout.tp > 1:
        comm["attn_allreduce"] = allreduce_time(cluster, ranks, max(
            s.get("attn_allreduce", 0.0) for s in sent))
        comm["combine"] = allreduce_time(cluster, ranks, max(s.get("combine", 0.0)
                                                             for s in sent))
    elif group > 1:
        local = len(grids[0].experts)
        comm["count_exchange"] = alltoallv_time(cluster, ranks, [8.0 * local * (group - 1)]
                                                * group)
        comm["dispatch"] = alltoallv_time(cluster, ranks, [s["dispatch"] for s in sent])
        comm["combine"] = alltoallv_time(cluster, ranks, [s["combine"] for s in sent])
    op = rates.op_us * 1e-6
    for name in comm:
        comm[name] += op * OPS.get(name, 2)
    layer = {name: max(p[name] for p in per_rank) for name in COMPUTE_PHASES}
    layer.update(comm)
    exposed = exposed_comm(layer, backend == "numpy") if overlap else dict(comm)
    for phases in per_rank:
        phases.update(exposed)
        for name in list(phases):
            phases[name] *= n_layers
    compute = sum(layer[name] for name in COMPUTE_PHASES)
    seconds = (compute + sum(exposed.values())) * n_layers
    alone = (compute + sum(comm.values())) * n_layers
    if backend != "numpy":
        # The pass's own uploads (positions, the attention schedule): launch-bound.
        seconds += op * GPU_OPS["pass"]
        alone += op * GPU_OPS["pass"]
    shape0 = rank_shape(config, grids[0], backend)
    if grids[0].is_first_stage:
        embed = max(embed_time(shape0, rates, t) for t in tokens)
        seconds += embed
        alone += embed
        for phases in per_rank:
            phases["embed"] = embed
    if grids[0].is_last_stage:
        head = max(lm_head_time(shape0, rates, len(new[g])) if grids[g].writes_outputs
                   else 0.0 for g in range(group))
        seconds += head
        alone += head
        for phases in per_rank:
            phases["lm_head"] = head
        hop = 0.0
    else:
        hop = max(p2p_time(cluster, r, r + group, s.get("stage_send", 0.0))
                  for r, s in zip(ranks, sent))
        hop += op * OPS["stage_send"]
        for phases, s in zip(per_rank, sent):
            phases["stage_send"] = op * OPS["stage_send"]
    return _StagePass(seconds, per_rank, hop, layer, exposed, 2 * seconds if overlap else None,
                      alone)


def _pipeline(passes: list[list[_StagePass]]) -> tuple[float, list[list[float]]]:
    """Makespan of stages x micro-batches in order, and each (stage, micro-batch)'s wait
    for its input (what the engine reports as stage_recv). Stage s starts micro-batch m
    once m has arrived from s-1 and the stage is free of m-1 (``seconds`` after starting
    it); m is handed on ``through`` after its start (_StagePass.through: longer than
    ``seconds`` when two micro-batches overlap)."""
    stages, micro = len(passes), len(passes[0])
    finish = [[0.0] * micro for _ in range(stages)]
    wait = [[0.0] * micro for _ in range(stages)]
    for s in range(stages):
        free = 0.0
        for m in range(micro):
            arrive = finish[s - 1][m] + passes[s - 1][m].hop if s else 0.0
            start = max(free, arrive)
            wait[s][m] = max(0.0, arrive - free) if s else 0.0
            free = start + passes[s][m].seconds
            finish[s][m] = start + passes[s][m].through(m == micro - 1)
    return max(finish[s][-1] for s in range(stages)), wait


def _run(config: RunConfig, layout: Layout, cluster: Cluster, rates: Rates, backend: str,
         lengths: np.ndarray, decode_context: float | None, imbalance: float) -> dict:
    """Simulate one prefill (``decode_context`` None) or one decode step."""
    group = layout.group
    if decode_context is None:
        micro = {r: _prefill_micro(config, layout, lengths, r, backend)
                 for r in range(layout.world_size)}
    else:
        micro = {r: _decode_micro(config, layout, lengths, r) for r in range(layout.world_size)}
    costs = {r: rank_cost(config, Grid(layout, config.model, r), lengths, backend)
             for r in range(layout.world_size)}
    overlap = overlap_applies(config, layout, len(micro[0]), backend)
    gpn = cluster.gpus_per_node
    known: dict = {}      # stage passes that differ only in which stage runs them
    passes = []
    for s in range(layout.pp):
        ranks = range(s * group, (s + 1) * group)
        stage_micro = [micro[r] for r in ranks]
        stage_costs = [costs[r] for r in ranks]
        where = (s == 0, s == layout.pp - 1, len(Grid(layout, config.model, ranks[0]).layers),
                 tuple(r // gpn - ranks[0] // gpn for r in ranks),
                 tuple(r // gpn == (r + group) // gpn for r in ranks))
        row = []
        for m in range(len(stage_micro[0])):
            key = (where, tuple((mb[m].lengths.tobytes(), mb[m].starts.tobytes())
                                for mb in stage_micro))
            if key not in known:
                known[key] = _stage_pass(config, layout, cluster, rates, backend, s,
                                         stage_micro, m, stage_costs, decode_context,
                                         imbalance, overlap)
            row.append(known[key])
        passes.append(row)
    makespan, wait = _pipeline(passes)
    totals: list[dict[str, float]] = []
    for s, row in enumerate(passes):
        for g in range(group):
            phases: dict[str, float] = {}
            for m, stage_pass in enumerate(row):
                for name, value in stage_pass.per_rank[g].items():
                    phases[name] = phases.get(name, 0.0) + value
                if s:
                    phases["stage_recv"] = phases.get("stage_recv", 0.0) + wait[s][m]
            totals.append(phases)
    busy = [sum(p.seconds for p in row) for row in passes]
    # The largest micro-batch's layer on the busiest stage: the "per layer" table.
    busiest = int(np.argmax(busy))
    biggest = max(passes[busiest], key=lambda p: p.seconds)
    return {"makespan": makespan, "stage_busy": busy, "rank_phases": totals,
            "layer": biggest.layer, "exposed": biggest.exposed,
            "hop": max(p.hop for row in passes for p in row),
            "micro_batches": len(passes[0]), "overlap": overlap}


def predict(config: RunConfig, layout: Layout, cluster: Cluster, rates: Rates,
            backend: str = "cupy", device_bytes: float = 80 * GIB,
            imbalance: float = 1.0) -> dict:
    """The prediction for one deployment (a JSON-able dict; format_prediction prints it).

    Prefill of the config's batch (all tokens real) through the pipeline, then one decode
    step of the same batch at a context of ``seq_len + new_tokens/2`` (new_tokens: the
    config's, or 128 when the workload is a prefill). ``imbalance`` (>= 1): the busiest
    expert rank's routed rows over the mean, for expert-parallel layouts (1: balanced, as
    costs.py and the paper assume; a real run's is in its report and output file).
    """
    if not imbalance >= 1.0:
        raise ConfigError("--routing-imbalance", f"{imbalance!r} must be >= 1 (max/mean)")
    model, work = config.model, config.workload
    world = layout.world_size
    if cluster.nodes is not None and world > cluster.nodes * cluster.gpus_per_node:
        raise LayoutError("layout", f"{layout} needs {world} GPUs but cluster {cluster.name} "
                                    f"has {cluster.nodes} nodes x {cluster.gpus_per_node} "
                                    f"(cluster.nodes)")
    lengths = np.full(work.batch_size, work.seq_len, dtype=np.int64)
    tokens = int(lengths.sum())
    prefill = _run(config, layout, cluster, rates, backend, lengths, None, imbalance)
    new_tokens = work.new_tokens if work.workload == "decode" else 128
    context = work.seq_len + new_tokens / 2
    step = _run(config, layout, cluster, rates, backend, lengths, context, imbalance)
    wall = prefill["makespan"]
    costs = [rank_cost(config, Grid(layout, model, r), lengths, backend,
                       new_tokens if work.workload == "decode" else 0) for r in range(world)]
    memory = max(c.memory_bytes for c in costs)
    rank_phases = prefill["rank_phases"]
    names = [p for p in ("embed", "stage_recv") + LAYER_ORDER + ("lm_head", "stage_send")
             if any(p in r for r in rank_phases)]
    phases_ms = {p: {"mean": float(np.mean([r.get(p, 0.0) for r in rank_phases])) * 1e3,
                     "max": float(np.max([r.get(p, 0.0) for r in rank_phases])) * 1e3}
                 for p in names}
    busiest = max(prefill["stage_busy"])
    comm_layer = sum(v for n, v in prefill["layer"].items() if n in COMM_PHASES)
    layer_total = sum(prefill["layer"].values())
    exposed_layer = sum(prefill["exposed"].values())
    after_total = layer_total - comm_layer + exposed_layer
    schedule = prefill_schedule(Grid(layout, model, 0), work, lengths, backend)
    tokens_per_s = tokens / wall if wall else 0.0
    decode_ms = step["makespan"] * 1e3
    sent = {key: max(c.send_bytes_per_layer.get(key, 0.0) for c in costs)
            for key in sorted({k for c in costs for k in c.send_bytes_per_layer})}
    return {
        "layout": str(layout),
        "world_size": world,
        "nodes": -(-world // cluster.gpus_per_node),
        "backend": backend,
        "routing_imbalance": imbalance if layout.tp == 1 else 1.0,
        "cluster": cluster_to_dict(cluster),
        "rates": {**{k: getattr(rates, k) for k in RATE_KEYS}, "source": rates.source},
        "batch_size": work.batch_size,
        "seq_len": work.seq_len,
        "tokens": tokens,
        "micro_batches": prefill["micro_batches"],
        "chunk_tokens": schedule.chunk.tokens,
        "chunk_reason": schedule.chunk.reason,
        "overlap": prefill["overlap"],
        "wall_s": wall,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / world,
        "bubble_fraction": 1.0 - busiest / wall if wall else 0.0,
        "bubble_fraction_ideal": (layout.pp - 1) / (prefill["micro_batches"] + layout.pp - 1),
        "comm_fraction_of_layer": comm_layer / layer_total if layer_total else 0.0,
        "comm_fraction_after_overlap": exposed_layer / after_total if after_total else 0.0,
        "layer_ms": {p: prefill["layer"][p] * 1e3 for p in LAYER_ORDER
                     if p in prefill["layer"]},
        "layer_exposed_ms": {p: v * 1e3 for p, v in prefill["exposed"].items()},
        "stage_busy_ms": [b * 1e3 for b in prefill["stage_busy"]],
        "stage_hop_ms": prefill["hop"] * 1e3,
        "phases_ms": phases_ms,
        "bytes_sent_per_layer_max": sent,
        "memory_gib_max": memory / GIB,
        "fits": memory <= device_bytes,
        "decode": {"context": context, "step_ms": decode_ms,
                   "tokens_per_s": work.batch_size / step["makespan"] if step["makespan"]
                   else 0.0,
                   "layer_ms": {p: step["layer"][p] * 1e3 for p in LAYER_ORDER
                                if p in step["layer"]}},
        "ms_per_token": {
            "reciprocal_throughput_us": 1e6 / tokens_per_s if tokens_per_s else 0.0,
            "prefill_ms_per_position": wall * 1e3 / work.seq_len,
            "decode_step_ms": decode_ms,
        },
    }


# --- the paper's deployments -------------------------------------------------------------

# The seed paper's claims (its text does not say at which GPU count each was measured; the
# issue's reading: EP at 256 GPUs, the baseline tp=8,pp=2 at 16).
PAPER_CLAIMS = {"ep": {"tokens_per_s": 450_000.0, "ms_per_token": 2.2},
                "baseline": {"tokens_per_s": 120_000.0, "ms_per_token": 8.3}}
PAPER_DEPLOYMENTS = (("EP, one expert per GPU", "ep=16,pp=16", 256, "ep"),
                     ("EP, 16 GPUs", "ep=16,pp=1", 16, "ep"),
                     ("TPxPP baseline", "tp=8,pp=2", 16, "baseline"))


def predict_paper(config: RunConfig, cluster: Cluster, rates: Rates,
                  backend: str = "cupy", device_bytes: float = 80 * GIB,
                  imbalance: float = 1.0) -> list[dict]:
    """The three deployments of the paper for ``config``'s model and batch, each with the
    paper's claim beside it, with the config's schedule (by default: chunks of the default
    size, which bound every deployment's activations by the chunk, not the batch)."""
    rows = []
    for label, text, world, kind in PAPER_DEPLOYMENTS:
        layout = Layout.parse(text, world).validate(config.model, world)
        row = predict(config, layout, cluster, rates, backend, device_bytes, imbalance)
        row["label"] = label
        row["paper"] = PAPER_CLAIMS[kind]
        rows.append(row)
    return rows


# --- comparing with a measured run ------------------------------------------------------

def measured_imbalance(expert_counts: np.ndarray, layout: Layout) -> float:
    """The ``imbalance`` of a real run: from its ``expert_counts`` [L, E] (the output
    file's), each layer's max over expert ranks of the rows they received over the mean,
    averaged over layers. 1.0 for tensor-parallel layouts (every rank runs every row)."""
    counts = np.asarray(expert_counts, dtype=np.float64)
    if layout.tp > 1 or layout.ep == 1:
        return 1.0
    per_rank = counts.reshape(counts.shape[0], layout.ep, -1).sum(axis=2)   # [L, ep]
    mean = per_rank.mean(axis=1)
    ratios = np.where(mean > 0, per_rank.max(axis=1) / np.where(mean > 0, mean, 1), 1.0)
    return float(ratios.mean())


def against_report(prediction: dict, report: dict) -> dict:
    """Predicted vs measured (a ``spmd-moe run --report`` JSON): wall time per forward and
    each phase's max over ranks; error = predicted / measured - 1."""
    if "phases_ms" not in report or "wall_s" not in report:
        raise ConfigError("--against", "not a spmd-moe run --report JSON (no wall_s, "
                                       "phases_ms)")
    if report.get("layout") and report["layout"] != prediction["layout"]:
        raise ConfigError("--against", f"the report ran layout {report['layout']}, the "
                                       f"prediction is for {prediction['layout']}")
    measured_wall = report["wall_s"]
    rows = {}
    for name in dict.fromkeys(list(prediction["phases_ms"]) + list(report["phases_ms"])):
        predicted = prediction["phases_ms"].get(name, {}).get("max", 0.0)
        measured = report["phases_ms"].get(name, {}).get("max", 0.0)
        rows[name] = {"predicted_ms": predicted, "measured_ms": measured}
    wall_p = prediction["wall_s"]
    return {"layout": prediction["layout"], "world_size": prediction["world_size"],
            "predicted_wall_ms": wall_p * 1e3, "measured_wall_ms": measured_wall * 1e3,
            "error": wall_p / measured_wall - 1.0 if measured_wall else float("nan"),
            "phases": rows}


# --- printing ----------------------------------------------------------------------------

def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def format_prediction(p: dict) -> str:
    routing = ("balanced" if p["routing_imbalance"] == 1 else
               f"busiest expert rank at {p['routing_imbalance']:.2f}x the mean")
    lines = [
        f"prediction: {p['layout']} on {p['world_size']} GPU(s), {p['nodes']} node(s); "
        f"{p['batch_size']} x {p['seq_len']} tokens, {p['micro_batches']} micro-batch(es) per "
        f"rank; backend {p['backend']}",
        f"  cluster {_describe_cluster(p['cluster'])}",
        "  rates " + ", ".join(f"{k} {p['rates'][k]:g}" for k in RATE_KEYS)
        + _rate_sources(p["rates"]["source"]),
        f"  routing: {routing}; memory: max {p['memory_gib_max']:.1f} GiB per rank"
        + ("" if p["fits"] else "  (DOES NOT FIT the device: spmd-moe plan says why)"),
        "  prefill micro-batches: " + (f"chunks of <= {p['chunk_tokens']} tokens per rank "
                                       f"({p['chunk_reason']})" if p["chunk_tokens"]
                                       else p["chunk_reason"])
        + f"; ideal bubble {p['bubble_fraction_ideal'] * 100:.1f}%; overlap "
        + ("on (two micro-batches in flight)" if p["overlap"] else "off"),
        "  one layer, largest micro-batch, busiest stage (ms; max over the stage's ranks; "
        "comm exposed after overlap):",
    ]
    for name, ms in p["layer_ms"].items():
        kind = "compute"
        if name in COMM_PHASES:
            kind = f"comm, {p['layer_exposed_ms'].get(name, ms):.3f} exposed"
        lines.append(f"    {name:<16}{ms:>12.3f}  {kind}")
    lines += [
        f"    {'total':<16}{sum(p['layer_ms'].values()):>12.3f}  "
        f"(communication {p['comm_fraction_of_layer'] * 100:.0f}%, "
        f"{p['comm_fraction_after_overlap'] * 100:.0f}% after overlap)",
        f"  stages: busy {', '.join(f'{b:.1f}' for b in p['stage_busy_ms'][:4])}"
        + (" ..." if len(p["stage_busy_ms"]) > 4 else "")
        + f" ms; stage-to-stage hop {p['stage_hop_ms']:.2f} ms; bubble "
          f"{p['bubble_fraction'] * 100:.0f}%",
        f"  prefill: {p['tokens']:,} tokens in {p['wall_s'] * 1e3:,.1f} ms -> "
        f"{_fmt_rate(p['tokens_per_s'])} tokens/s ({_fmt_rate(p['tokens_per_s_per_gpu'])} "
        "per GPU)",
        f"  decode step (batch {p['batch_size']}, context {p['decode']['context']:.0f}): "
        f"{p['decode']['step_ms']:.2f} ms -> {_fmt_rate(p['decode']['tokens_per_s'])} "
        "tokens/s",
        "  ms/token: decode step (this project's meaning) "
        f"{p['ms_per_token']['decode_step_ms']:.2f} ms; 1/throughput "
        f"{p['ms_per_token']['reciprocal_throughput_us']:.3f} us; prefill wall / seq_len "
        f"{p['ms_per_token']['prefill_ms_per_position']:.3f} ms",
    ]
    return "\n".join(lines)


def _describe_cluster(c: dict) -> str:
    intra, inter = c["intra_node"], c["inter_node"]
    nodes = f"{c['nodes']} x " if c.get("nodes") else ""
    return (f"{c['name']}: {nodes}{c['gpus_per_node']} GPUs/node, intra "
            f"{intra['bandwidth_gbytes_per_s']:g} GB/s {intra['latency_us']:g} us, inter "
            f"{inter['bandwidth_gbytes_per_s']:g} GB/s {inter['latency_us']:g} us")


def _rate_sources(source: dict) -> str:
    kinds = sorted(set(source.values()))
    return f" [{'; '.join(kinds)}]" if kinds else ""


def format_paper(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        f"paper-scale prediction: {first['batch_size']} x {first['seq_len']} tokens, backend "
        f"{first['backend']}",
        f"  cluster {_describe_cluster(first['cluster'])}",
        "  rates " + ", ".join(f"{k} {first['rates'][k]:g}" for k in RATE_KEYS)
        + _rate_sources(first["rates"]["source"]),
        "",
        f"  {'deployment':<34}{'GPUs':>5}{'chunk':>7}{'M':>5}{'tokens/s':>12}{'paper':>10}"
        f"{'/GPU':>9}{'1/thr us':>10}{'paper':>7}{'decode ms':>11}{'bubble':>8}"
        f"{'comm':>6}{'after':>7}{'fits':>6}",
    ]
    for r in rows:
        lines.append(
            f"  {r['label'] + ' ' + r['layout']:<34}{r['world_size']:>5}"
            f"{r['chunk_tokens'] or '-':>7}{r['micro_batches']:>5}"
            f"{_fmt_rate(r['tokens_per_s']):>12}{_fmt_rate(r['paper']['tokens_per_s']):>10}"
            f"{_fmt_rate(r['tokens_per_s_per_gpu']):>9}"
            f"{r['ms_per_token']['reciprocal_throughput_us']:>10.3f}"
            f"{r['paper']['ms_per_token']:>7.1f}{r['decode']['step_ms']:>11.2f}"
            f"{r['bubble_fraction'] * 100:>7.0f}%{r['comm_fraction_of_layer'] * 100:>5.0f}%"
            f"{r['comm_fraction_after_overlap'] * 100:>6.0f}%"
            f"{'yes' if r['fits'] else 'NO':>6}")
    ep256, ep16, base = rows
    claim = PAPER_CLAIMS["ep"]["tokens_per_s"] / PAPER_CLAIMS["baseline"]["tokens_per_s"]
    lines += [
        "",
        f"  ratio EP(256)/baseline(16): predicted "
        f"{ep256['tokens_per_s'] / base['tokens_per_s']:.2f}x, paper {claim:.2f}x; "
        "EP(16)/baseline(16), same GPUs: "
        f"{ep16['tokens_per_s'] / base['tokens_per_s']:.2f}x",
        "  chunk: prefill chunk tokens per rank; M: micro-batches per rank; comm: share of a",
        "  layer; after: exposed share once two micro-batches overlap their exchanges.",
        "  'paper' ms/token: 2.2 and 8.3 are 1e6/450,000 and 1e6/120,000, i.e. the reciprocal",
        "  throughput in microseconds (the '1/thr us' column), not a per-step latency; the",
        "  decode column is this project's ms/token (one decode step of the whole batch).",
    ]
    return "\n".join(lines)


def format_against(a: dict) -> str:
    lines = [f"predicted vs measured: {a['layout']} on {a['world_size']} rank(s): wall "
             f"{a['predicted_wall_ms']:.1f} vs {a['measured_wall_ms']:.1f} ms "
             f"(error {a['error'] * 100:+.0f}%)",
             f"  {'phase (max over ranks)':<24}{'predicted ms':>14}{'measured ms':>14}"]
    for name, row in a["phases"].items():
        lines.append(f"  {name:<24}{row['predicted_ms']:>14.3f}{row['measured_ms']:>14.3f}")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------


