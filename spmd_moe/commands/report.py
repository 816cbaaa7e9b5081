"""Where the time goes: per-phase times over ranks, throughput, bytes, expert load, MFU.

:func:`build_report` is collective (every rank sends its own summary to rank 0) and returns
the report dict on rank 0, ``None`` elsewhere; :func:`format_report` renders the table rank
0 prints. Phase times are each rank's mean over the timed iterations; the report gives the
mean and the max of those over ranks (the max is what a bulk-synchronous loop waits for).
"""
from __future__ import annotations

import json
import platform
import re

import numpy as np

from .. import __version__
from ..core.config import to_dict
from ..core.costs import layer_flops
from ..core.phases import PHASES, STAGE_IDLE_PHASES
from ..engine.runner import RunResult, Timing
from ..engine.session import Session
from ..model.inputs import Batch


def _mean_timing(timings: list[Timing]) -> dict:
    """One rank's per-iteration means: phases (s), bytes, counters, exchanges (s), wall (s),
    and its idle time (s): the wall time it spent neither computing nor exchanging within
    its stage (waiting for the previous stage, for its sends to drain, for the last stage
    at the closing barrier) - its share of the pipeline bubble."""
    n = max(1, len(timings))
    phases: dict[str, float] = {}
    sent: dict[str, float] = {}
    counters: dict[str, float] = {}
    exchanges: dict[str, float] = {}
    idle = 0.0
    for t in timings:
        for key, value in t.phases.items():
            phases[key] = phases.get(key, 0.0) + value / n
        for key, value in t.bytes_sent.items():
            sent[key] = sent.get(key, 0.0) + value / n
        for key, value in t.counters.items():
            counters[key] = counters.get(key, 0.0) + value / n
        for key, value in t.exchanges.items():
            exchanges[key] = exchanges.get(key, 0.0) + value / n
        busy = sum(v for k, v in t.phases.items() if k not in STAGE_IDLE_PHASES)
        idle += max(0.0, t.wall - busy) / n
    return {"phases": phases, "bytes": sent, "counters": counters, "exchanges": exchanges,
            "idle": idle, "wall": [t.wall for t in timings]}


def rank_flops(session: Session, batch: Batch, expert_rows: float) -> float:
    """FLOPs this rank did in one forward pass, from the real lengths and the rows its
    experts actually processed."""
    topo, model = session.topo, session.config.model
    mine = topo.sequences(batch.batch_size)
    lengths = batch.lengths[mine.start:mine.stop]
    per_layer = layer_flops(model, int(lengths.sum()), lengths, len(topo.heads), 0.0,
                            len(topo.ff_columns), len(topo.kv_heads))
    flops = (per_layer["attention_proj"] + per_layer["attention_core"]
             + per_layer["router"]) * len(topo.layers)
    flops += 2.0 * expert_rows * model.expert_matrices * model.d_model * len(topo.ff_columns)
    if topo.is_last_stage and topo.writes_outputs:
        flops += 2.0 * len(lengths) * model.d_model * model.vocab_size
    return flops


def _over_ranks(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "max": float(np.max(values))}


def _phase_table(summaries: list[dict], key: str = "phases") -> dict[str, dict[str, float]]:
    names = [p for p in PHASES if any(p in s[key] for s in summaries)]
    return {p: {stat: v * 1e3 for stat, v in
                _over_ranks([s[key].get(p, 0.0) for s in summaries]).items()} for p in names}


def _per_rank(summaries: list[dict], decode: bool) -> dict:
    """Columns over ranks (index = rank): stage, group rank (expert- or tensor-rank), and
    per phase each rank's mean ms (to 0.1 us; null where it has no such phase), of the
    iterations and, for decode, of the steps. Columns keep the report small."""
    out = {"stage": [s["stage"] for s in summaries],
           "group_rank": [s["group_rank"] for s in summaries]}
    for key, name in (("phases", "phases_ms"), ("step_phases", "step_phases_ms")):
        if key == "step_phases" and not decode:
            continue
        out[name] = {p: [round(s[key][p] * 1e3, 4) if p in s[key] else None
                         for s in summaries]
                     for p in PHASES if any(p in s[key] for s in summaries)}
    return out


def _weights_block(session: Session, summaries: list[dict]) -> dict:
    """Where the weights came from, and per rank the bytes read from the checkpoint and the
    seconds it took to read (or generate) them."""
    read = [float(s["load"][0]) for s in summaries]
    seconds = [float(s["load"][1]) for s in summaries]
    return {"source": session.weights_source, "dtype": session.config.model.dtype,
            "family": session.config.model.family,
            "bytes_read_per_rank": read, "load_s_per_rank": seconds,
            "bytes_read": _over_ranks(read), "load_s": _over_ranks(seconds)}


SLOW_FACTOR = 3.0   # an iteration this many times the median of the others is flagged


def slow_iterations(walls_ms: list[float]) -> list[dict]:
    """Iterations (1-based) slower than SLOW_FACTOR x the median of the other iterations:
    a stall that ended, a noisy neighbour, a first iteration without --warmup."""
    flagged = []
    for i, wall in enumerate(walls_ms):
        others = walls_ms[:i] + walls_ms[i + 1:]
        if not others:
            continue
        median = float(np.median(others))
        if median > 0 and wall > SLOW_FACTOR * median:
            flagged.append({"iteration": i + 1, "wall_ms": wall, "median_others_ms": median,
                            "times_median": wall / median})
    return flagged


def _memory(summaries: list[dict]) -> dict:
    """RSS per rank in MB: before the first timed iteration, after it, after the last, the
    growth between those two (a leak's measure), and the peak."""
    keys = (("rss_before", "rss_before_mb"), ("rss_first", "rss_first_mb"),
            ("rss_end", "rss_end_mb"), ("peak_rss", "peak_rss_mb"))
    by_rank = []
    for r, s in enumerate(summaries):
        row = {"rank": r, **{name: s["memory"].get(key, 0) / 1e6 for key, name in keys}}
        row["growth_mb"] = row["rss_end_mb"] - row["rss_first_mb"]
        by_rank.append(row)
    out = {name: _over_ranks([row[name] for row in by_rank])
           for name in [name for _, name in keys] + ["growth_mb"]}
    out["by_rank"] = by_rank
    return out


def _stage_idle(summaries: list[dict], stages: int) -> list[dict]:
    """Per stage: its ranks' measured idle time per forward (ms; mean and max over the
    stage's ranks) and as a fraction of the wall time: the measured bubble."""
    out = []
    for stage in range(stages):
        mine = [s for s in summaries if s["stage"] == stage]
        idle = [s["idle"] * 1e3 for s in mine]
        # Each rank's idle share of its own wall time (ranks leave a barrier at slightly
        # different times), averaged over the stage.
        share = [s["idle"] / np.mean(s["wall"]) if np.mean(s["wall"]) else 0.0 for s in mine]
        out.append({"stage": stage, "idle_ms": {"mean": float(np.mean(idle)),
                                                "max": float(np.max(idle))},
                    "idle_fraction": float(np.mean(share))})
    return out


def _overlap_summary(summaries: list[dict], on: bool, asked: str, micro: int,
                     group: int, stages: int) -> dict:
    """Whether two micro-batches were in flight (and why not), and the exchanges' time in
    flight, exposed and hidden per forward (ms; mean and max over ranks): overlap.py
    defines them."""
    why = ("two micro-batches in flight" if on else "off: --no-overlap" if asked == "off" else
           "off: one micro-batch" if micro < 2 else "off: one rank per stage" if group < 2
           else f"off: {micro} micro-batches over {stages} stages do not pay for the "
                f"doubled fill (chunks.overlap_pays)")
    out: dict = {"enabled": on, "reason": why}
    for key in ("in_flight", "exposed", "hidden"):
        out[f"{key}_ms"] = _over_ranks([s["exchanges"].get(f"{key}_s", 0.0) * 1e3
                                        for s in summaries])
    flying = out["in_flight_ms"]["mean"]
    out["hidden_fraction"] = out["hidden_ms"]["mean"] / flying if flying else 0.0
    return out


def build_report(session: Session, batch: Batch, result: RunResult) -> dict | None:
    """Collective over the world; the report on rank 0, ``None`` elsewhere."""
    with session.watchdog.waiting("report"):
        return _build_report(session, batch, result)


def _build_report(session: Session, batch: Batch, result: RunResult) -> dict | None:
    topo, config = session.topo, session.config
    world = topo.world
    decode = bool(result.step_timings)
    mine = _mean_timing(result.timings)
    mine["flops"] = rank_flops(session, batch, mine["counters"].get("expert_rows", 0.0))
    mine["peak"] = session.peak_flops
    mine["load"] = (session.load.bytes_read, session.load.seconds)
    mine["memory"] = result.memory
    mine["stage"] = topo.stage
    mine["group_rank"] = topo.group_rank
    mine["micro_batches"] = result.schedule.count if result.schedule else 0
    if decode:
        steps = _mean_timing(result.step_timings)
        mine["step_phases"] = steps["phases"]
        mine["step_walls"] = steps["wall"]
        mine["step_bytes"] = steps["bytes"]
    counts = np.zeros_like(result.expert_counts)
    world.Reduce(result.expert_counts, counts, root=0)
    summaries = world.gather(mine, root=0)
    if topo.rank != 0:
        return None

    walls = np.asarray(summaries[0]["wall"])           # identical on all ranks (barriers)
    wall = float(walls.mean())
    tokens = batch.n_tokens
    layout = topo.layout
    # Micro-batches the engine ran (stage passes per prefill), not those the config asked;
    # whether two went in flight is what the engine decided from its schedule's count.
    micro = int(round(max(s["counters"].get("stage_passes", 0.0) for s in summaries)))
    schedule = result.schedule
    scheduled = max(s["micro_batches"] for s in summaries)
    overlap = session.engine.overlaps(scheduled)
    flops = [s["flops"] for s in summaries]
    peak = float(np.mean([s["peak"] for s in summaries]))
    bytes_total = [sum(s["bytes"].values()) for s in summaries]
    load = []
    for layer in range(config.model.n_layers):
        row = counts[layer].astype(np.float64)
        mean = row.mean()
        load.append({"layer": layer, "max": int(row.max()), "mean": float(mean),
                     "max_over_mean": float(row.max() / mean) if mean else 0.0})
    report = {
        "version": __version__,
        "workload": "decode" if decode else "prefill",
        "layout": str(layout),
        "world_size": topo.size,
        "backend": {"name": session.backend.name, "reason": session.backend_choice.reason,
                    "device": session.backend_choice.device_name or platform.processor()
                    or platform.machine(), "kernels": session.backend.kernels is not None,
                    "kernels_reason": session.backend.kernels_reason,
                    "matmul": session.backend.matmul_path},
        "weights": _weights_block(session, summaries),
        "transport": {"name": session.transport_choice.name,
                      "reason": session.transport_choice.reason},
        "mpi": {"library": session.library.version, "cuda_aware": session.library.cuda_aware,
                "cuda_reason": session.library.cuda_reason},
        "config": to_dict(config),
        "batch_size": batch.batch_size,
        "seq_len": batch.seq_len,
        "tokens": tokens,
        "iterations": len(walls),
        "wall_s": wall,
        "wall_s_min": float(walls.min()),
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "phases_ms": _phase_table(summaries),
        "bytes_sent_per_rank": {**_over_ranks(bytes_total), "by_phase": {
            p: _over_ranks([s["bytes"].get(p, 0.0) for s in summaries])
            for p in PHASES if any(p in s["bytes"] for s in summaries)}},
        "expert_load": load,
        # What `spmd-moe plot` draws: routed rows per (layer, expert) over all ranks, and
        # each rank's mean phase times (ms) with its place in the layout.
        "expert_counts": counts.astype(np.int64).tolist(),
        "per_rank": _per_rank(summaries, decode),
        "flops_per_rank": _over_ranks(flops),
        "achieved_tflops_per_rank": float(np.mean(flops)) / wall / 1e12 if wall else 0.0,
        "peak_tflops": peak / 1e12,
        "peak_source": session.peak_source,
        "mfu": float(np.sum(flops)) / (wall * peak * len(flops)) if wall and peak else 0.0,
        "pipeline": {"stages": layout.pp, "micro_batches": micro,
                     "chunk_tokens": schedule.chunk.tokens if schedule else None,
                     "chunk_reason": schedule.chunk.reason if schedule else "",
                     "bubble_fraction_ideal": (layout.pp - 1) / max(1, micro + layout.pp - 1),
                     "stage_recv_ms": _over_ranks([s["phases"].get("stage_recv", 0.0) * 1e3
                                                   for s in summaries]),
                     # Per stage: mean time its ranks waited on the previous stage, and
                     # their idle time (neither computing nor exchanging within the stage).
                     "stage_recv_ms_by_stage": [float(np.mean(
                         [s["phases"].get("stage_recv", 0.0) * 1e3 for s in summaries
                          if s["stage"] == stage])) for stage in range(layout.pp)],
                     "stage_idle": _stage_idle(summaries, layout.pp)},
        "overlap": _overlap_summary(summaries, overlap, config.workload.overlap, scheduled,
                                    layout.group, layout.pp),
        "slow_iterations": slow_iterations([w * 1e3 for w in walls.tolist()]),
        "memory_per_rank": _memory(summaries),
        "watchdog": session.watchdog.status,
    }
    if decode:
        step_walls = np.asarray(summaries[0]["step_walls"]) * 1e3
        generated = batch.batch_size * (len(step_walls))
        small = ("count_exchange", "dispatch", "combine")
        step_table = _phase_table(summaries, "step_phases")
        step_mean = float(step_walls.mean()) if len(step_walls) else 0.0
        report["decode"] = {
            "new_tokens": len(step_walls) + 1,
            "ttft_ms": wall * 1e3,
            "per_token_ms": ({"mean": step_mean, "p50": float(np.percentile(step_walls, 50)),
                              "p99": float(np.percentile(step_walls, 99))}
                             if len(step_walls) else {}),
            "decode_tokens_per_s": generated / (step_walls.sum() / 1e3)
            if len(step_walls) else 0.0,
            "step_phases_ms": step_table,
            "step_ms": [round(ms, 3) for ms in step_walls.tolist()],
            "slow_steps": slow_iterations(step_walls.tolist()),
            "alltoall_share": (sum(step_table.get(p, {}).get("max", 0.0) for p in small)
                               / step_mean if step_mean else 0.0),
        }
    return report


def format_report(report: dict) -> str:
    """The table rank 0 prints."""
    lines = [
        f"spmd-moe {report['workload']}: layout {report['layout']} on {report['world_size']} "
        f"rank(s), backend {report['backend']['name']} ({report['backend']['device']}), "
        f"transport {report['transport']['name']}",
        *([f"  kernels: {report['backend']['kernels_reason']}; matmul: "
           f"{report['backend']['matmul']}"] if report['backend']['name'] == "cupy" else []),
        f"  tokens {report['tokens']}  wall {report['wall_s'] * 1e3:.1f} ms (mean of "
        f"{report['iterations']})  {report['tokens_per_s']:,.0f} tokens/s",
        f"  {report['achieved_tflops_per_rank'] * 1e3:.2f} GFLOP/s per rank, MFU "
        f"{report['mfu'] * 100:.1f}% of {report['peak_tflops'] * 1e3:.1f} GFLOP/s "
        f"({report['peak_source']})",
        f"  weights: {report['weights']['source']} ({report['weights']['family']}, "
        f"{report['weights']['dtype']}): "
        + (f"read {report['weights']['bytes_read']['mean'] / 1e6:.3f} MB per rank (max "
           f"{report['weights']['bytes_read']['max'] / 1e6:.3f}), "
           if report['weights']['bytes_read']['max'] else "")
        + f"load {report['weights']['load_s']['mean']:.3f} s per rank (max "
        f"{report['weights']['load_s']['max']:.3f})",
        f"  bytes sent per rank: mean {report['bytes_sent_per_rank']['mean'] / 1e6:.3f} MB, "
        f"max {report['bytes_sent_per_rank']['max'] / 1e6:.3f} MB",
    ]
    memory = report["memory_per_rank"]
    lines.append(f"  memory per rank (max): RSS {memory['rss_before_mb']['max']:.0f} MB before "
                 f"the first iteration, {memory['rss_first_mb']['max']:.0f} after it, "
                 f"{memory['rss_end_mb']['max']:.0f} after the last (growth "
                 f"{memory['growth_mb']['max']:+.1f}), peak {memory['peak_rss_mb']['max']:.0f}")
    pipe = report["pipeline"]
    chunk = (f"chunks of <= {pipe['chunk_tokens']} tokens ({pipe['chunk_reason']})"
             if pipe["chunk_tokens"] else pipe["chunk_reason"])
    lines.append(f"  prefill: {chunk}")
    waiting = ("; waiting on previous stage per stage [" + ", ".join(
        f"{ms:.1f}" for ms in pipe["stage_recv_ms_by_stage"]) + "] ms"
        if pipe["stages"] > 1 else "")
    lines.append(f"  pipeline: {pipe['stages']} stage(s) x {pipe['micro_batches']} "
                 f"micro-batch(es), ideal bubble {pipe['bubble_fraction_ideal'] * 100:.1f}%; "
                 "measured idle per stage: " + ", ".join(
                     f"{st['idle_ms']['mean']:.1f} ms ({st['idle_fraction'] * 100:.0f}%)"
                     for st in pipe["stage_idle"]) + waiting)
    ov = report["overlap"]
    lines.append(f"  overlap: {ov['reason']}; exchanges in flight "
                 f"{ov['in_flight_ms']['mean']:.1f} ms, exposed {ov['exposed_ms']['mean']:.1f} "
                 f"ms, hidden {ov['hidden_ms']['mean']:.1f} ms "
                 f"({ov['hidden_fraction'] * 100:.0f}%) per rank")
    for label, flagged in (("iteration", report["slow_iterations"]),
                           ("decode step", report.get("decode", {}).get("slow_steps", []))):
        for slow in flagged:
            lines.append(f"  warning: {label} {slow['iteration']} took {slow['wall_ms']:.1f} "
                         f"ms, {slow['times_median']:.0f}x the median of the others "
                         f"({slow['median_others_ms']:.1f} ms)")
    load = report["expert_load"]
    if load:
        worst = max(load, key=lambda r: r["max_over_mean"])
        lines.append(f"  expert load max/mean: worst layer {worst['layer']} "
                     f"{worst['max_over_mean']:.2f}, mean over layers "
                     f"{np.mean([r['max_over_mean'] for r in load]):.2f}")
    lines.append(f"  {'phase':<16}{'mean ms':>12}{'max ms':>12}")
    for name, stats in report["phases_ms"].items():
        lines.append(f"  {name:<16}{stats['mean']:>12.3f}{stats['max']:>12.3f}")
    if "decode" in report:
        dec = report["decode"]
        per = dec["per_token_ms"]
        lines.append(f"  decode: {dec['new_tokens']} tokens, time to first token "
                     f"{dec['ttft_ms']:.1f} ms" + (
                         f", per token mean {per['mean']:.2f} ms p50 {per['p50']:.2f} "
                         f"p99 {per['p99']:.2f}, {dec['decode_tokens_per_s']:,.0f} tokens/s, "
                         f"dispatch+combine {dec['alltoall_share'] * 100:.0f}% of a step"
                         if per else ""))
        for name, stats in dec["step_phases_ms"].items():
            lines.append(f"    step {name:<11}{stats['mean']:>12.3f}{stats['max']:>12.3f}")
    return "\n".join(lines)


def report_json(report: dict) -> str:
    """The report as indented JSON, a list of numbers on one line (expert_counts' rows,
    the per-rank columns, decode's step times) instead of one number per line."""
    text = json.dumps(report, indent=2)
    return re.sub(r"\[(\s+(?:[-+0-9.eE]+|null),?)+\s+\]", lambda m: "[" + ", ".join(
        item.strip().rstrip(",") for item in m.group(0)[1:-1].split("\n")
        if item.strip()) + "]", text) + "\n"

