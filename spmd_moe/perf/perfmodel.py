"""``spmd-moe plan --predict``: the time of a run of this engine on a GPU cluster.

:func:`predict` takes a config, a layout, a :class:`~.cluster.Cluster` and kernel
:class:`~.cluster.Rates` and returns per-phase times of a layer, per-stage times, the
pipeline's makespan and bubble, tokens/s and ms/token. It composes compute.py (a roofline
per GEMM plus elementwise passes and per-launch overhead), comm.py (Alltoallv, allreduce
and stage-to-stage times over NVLink and InfiniBand), the engine's micro-batch schedule
and its two-micro-batch overlap (communication hidden under the twin's compute where
chunks.overlap_enabled turns it on), then the pipeline recurrence
``C[s][m] = max(C[s-1][m] + hop, C[s][m-1]) + tau[s][m]``. :func:`predict_paper` runs the
paper's three deployments; :func:`against_report` sets a prediction beside a measured run.
docs/CLUSTER.md derives the equations.

Notation: t tokens of a micro-batch on one rank, T the stage's tokens of it, d width,
w = heads*Dh this rank's attention width, f this rank's F slice, E experts, El local
experts, k top-k, s storage bytes, p parameter bytes, P ranks in a stage, M micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.chunks import MicroBatch, overlap_enabled, prefill_schedule, whole_sequences
from ..core.config import Layout, RunConfig
from ..core.costs import GIB, rank_cost
from ..core.errors import ConfigError, LayoutError
from ..core.files import JsonFields
from ..core.phases import LAYER_COMM_PHASES, LAYER_COMPUTE_PHASES, LAYER_PHASES
from ..core.topology import Grid
from .cluster import RATE_KEYS, Cluster, Rates, cluster_to_dict
from .comm import allreduce_time, alltoallv_time, p2p_time
from .compute import (GPU_OPS, MODEL_TRANSPORT, OPS, embed_time, gpu_layer_waits, layer_compute,
                      lm_head_time, rank_shape)

# --- the prediction --------------------------------------------------------------------



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
    """As engine.Engine.overlaps (chunks.overlap_enabled)."""
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
    out = {name: layer[name] for name in LAYER_COMM_PHASES if name in layer}
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
    if backend != "numpy":
        # A host wait for the device idles it while the host queues the next kernel.
        for name, waits in gpu_layer_waits(MODEL_TRANSPORT, layout.tp).items():
            if name in comm:
                comm[name] += op * waits
            else:
                for phases in per_rank:
                    phases[name] += op * waits
    layer = {name: max(p[name] for p in per_rank) for name in LAYER_COMPUTE_PHASES}
    layer.update(comm)
    exposed = exposed_comm(layer, backend == "numpy") if overlap else dict(comm)
    for phases in per_rank:
        phases.update(exposed)
        for name in list(phases):
            phases[name] *= n_layers
    compute = sum(layer[name] for name in LAYER_COMPUTE_PHASES)
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
    names = [p for p in ("embed", "stage_recv") + LAYER_PHASES + ("lm_head", "stage_send")
             if any(p in r for r in rank_phases)]
    phases_ms = {p: {"mean": float(np.mean([r.get(p, 0.0) for r in rank_phases])) * 1e3,
                     "max": float(np.max([r.get(p, 0.0) for r in rank_phases])) * 1e3}
                 for p in names}
    busiest = max(prefill["stage_busy"])
    comm_layer = sum(v for n, v in prefill["layer"].items() if n in LAYER_COMM_PHASES)
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
        "layer_ms": {p: prefill["layer"][p] * 1e3 for p in LAYER_PHASES
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
                   "layer_ms": {p: step["layer"][p] * 1e3 for p in LAYER_PHASES
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
    fields = JsonFields(report, "--against", error=ConfigError)
    if "phases_ms" not in fields or "wall_s" not in fields:
        raise ConfigError("--against", "not a spmd-moe run --report JSON (no wall_s, "
                                       "phases_ms)")
    layout = fields.get("layout", "string", None)
    if layout and layout != prediction["layout"]:
        raise ConfigError("--against", f"the report ran layout {layout}, the "
                                       f"prediction is for {prediction['layout']}")
    measured_wall = fields.get("wall_s", "number")
    phases = fields.fields("phases_ms")
    rows = {}
    for name in dict.fromkeys(list(prediction["phases_ms"]) + list(phases.data)):
        predicted = prediction["phases_ms"].get(name, {}).get("max", 0.0)
        measured = phases.fields(name).get("max", "number", 0.0) if name in phases else 0.0
        rows[name] = {"predicted_ms": predicted, "measured_ms": measured}
    wall_p = prediction["wall_s"]
    return {"layout": prediction["layout"], "world_size": prediction["world_size"],
            "predicted_wall_ms": wall_p * 1e3, "measured_wall_ms": measured_wall * 1e3,
            "error": wall_p / measured_wall - 1.0 if measured_wall else float("nan"),
            "phases": rows}
