"""``spmd-moe compare``: the paper's two deployments on one world size and one workload.

In one MPI job, on the same batch and the same weights (SPEC §1 weights are layout
independent), run

1. the expert-parallel deployment (default ``ep`` = world size, ``pp = 1``; when that does
   not fit the model, the largest ``ep`` dividing both the world size and ``n_experts``
   whose ``pp`` = W/ep is at most ``n_layers``), then
2. the tensor-parallel x pipeline baseline (default ``tp`` = the largest divisor of W that
   divides ``n_heads`` and ``d_ff`` with ``pp`` = W/tp at most ``n_layers``),

check that their outputs agree, and set per-phase times, tokens/s and the ratio side by
side. :func:`run_compare` is the Python API (collective; the comparison on rank 0); the
command is a thin layer over it.

Agreement: float32 runs must give identical ``expert_counts`` (and greedy tokens) and
logits/hidden within a relative error of 1e-4; bfloat16 runs round differently in the two
layouts (TP sums float32 partials before rounding, EP rounds each expert's output), so
only the relative errors are checked (2e-2) and differing counts are reported, not failed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..core.config import Layout, ModelConfig, RunConfig
from ..core.errors import ConfigError, LayoutError, collective, say
from ..engine.testing import relative_error

# Relative L2 error allowed between the two deployments' logits and hidden states.
RTOL = {"float32": 1e-4, "bfloat16": 2e-2}


# --- which layouts ---------------------------------------------------------------------

def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _fits(layout: Layout, model: ModelConfig) -> bool:
    """Whether Layout.validate accepts ``layout`` for ``model`` (its rules, not a copy)."""
    try:
        layout.validate(model, layout.world_size)
    except LayoutError:
        return False
    return True


def _widest_fitting(model: ModelConfig, world_size: int, layout_of) -> Layout | None:
    """``layout_of(n)`` for the largest divisor n of the world size that fits, or None."""
    for n in _divisors_descending(world_size):
        if _fits(layout_of(n), model):
            return layout_of(n)
    return None


def default_ep_layout(model: ModelConfig, world_size: int) -> Layout:
    """``ep = W, pp = 1`` when it fits, else the largest ``ep`` dividing W and ``n_experts``
    with ``pp = W/ep <= n_layers``; refuses (naming the constraints) when none does."""
    found = _widest_fitting(model, world_size, lambda n: Layout(ep=n, tp=1,
                                                                 pp=world_size // n))
    if found is not None:
        return found
    raise LayoutError("--ep-layout", (
        f"no expert-parallel layout fits {world_size} ranks: ep must divide both the world "
        f"size and n_experts={model.n_experts}, and pp = {world_size}/ep must be at most "
        f"n_layers={model.n_layers}; change the rank count or the model (--set), or give "
        "--ep-layout"))


def default_baseline_layout(model: ModelConfig, world_size: int) -> Layout:
    """The largest ``tp`` dividing W, ``n_heads`` and ``d_ff`` with ``pp = W/tp <=
    n_layers``; ``tp = 1`` (a pure pipeline) when only that fits."""
    found = _widest_fitting(model, world_size, lambda n: Layout(ep=1, tp=n,
                                                                 pp=world_size // n))
    if found is not None:
        return found
    raise LayoutError("--baseline-layout", (
        f"no tensor-parallel baseline fits {world_size} ranks: tp must divide the world size, "
        f"n_heads={model.n_heads} and d_ff={model.d_ff}, and pp = {world_size}/tp must be at "
        f"most n_layers={model.n_layers}; change the rank count or the model (--set), or give "
        "--baseline-layout"))


def layout_name(layout: Layout, baseline: bool) -> str:
    """``tp=1,pp=3`` for a baseline that degenerated to a pure pipeline (Layout prints it
    as ``ep=1,pp=3``)."""
    if baseline and layout.tp == 1:
        return f"tp=1,pp={layout.pp}"
    return str(layout)


def resolve_layouts(model: ModelConfig, world_size: int, ep_text: str | None = None,
                    baseline_text: str | None = None) -> tuple[Layout, Layout]:
    """The two layouts to compare, validated for ``world_size``."""
    if ep_text:
        ep = Layout.parse(ep_text, world_size)
        if ep.tp > 1:
            raise LayoutError("--ep-layout", f"{ep_text!r} is tensor parallel; give ep=N[,pp=M]")
        ep.validate(model, world_size)
    else:
        ep = default_ep_layout(model, world_size)
    if baseline_text:
        baseline = Layout.parse(baseline_text, world_size)
        if baseline.ep > 1:
            raise LayoutError("--baseline-layout", f"{baseline_text!r} is expert parallel; "
                                                   "give tp=N[,pp=M]")
        baseline.validate(model, world_size)
    else:
        baseline = default_baseline_layout(model, world_size)
    return ep, baseline


# --- running ---------------------------------------------------------------------------

@dataclass
class RunOptions:
    """How each deployment runs (the same for both)."""

    backend: str = "auto"
    transport: str = "auto"
    warmup: int = 0
    iters: int = 1
    memory_limit: int | None = None
    watchdog: object = None          # the CLI's watchdog.Watchdog (none: nothing watched)
    tracer: object = None            # trace.Tracer (--trace): both deployments, one file
    progress: object = None          # progress.Reporter (rank 0's progress; none: silent)


def run_deployment(config: RunConfig, comm, batch, layout: Layout,
                   options: RunOptions, index: int = 0,
                   name: str = "") -> tuple[dict | None, dict | None]:
    """Open a session with ``layout``, run the config's workload, close it. Collective.

    Returns ``(outputs, report)`` on rank 0 (outputs as written by ``spmd-moe run
    --output``: ``hidden`` float32 [B, S, d] for prefill, ``logits`` float32 [B, V],
    ``expert_counts`` int64 [L, E], ``tokens`` int64 [B, N] for decode) and
    ``(None, None)`` elsewhere. With ``options.tracer`` its ranks are the trace's processes
    ``index * world size + rank``, named ``name: rank ...``.
    """
    from ..core.progress import SILENT
    from .report import build_report
    from ..engine.runner import open_session, run_decode, run_prefill, trace_session

    work = config.workload
    decode = work.workload == "decode"
    session = open_session(config, comm, batch, layout=str(layout), backend=options.backend,
                           transport=options.transport,
                           new_tokens=work.new_tokens if decode else 0,
                           memory_limit=options.memory_limit, watchdog=options.watchdog,
                           progress=options.progress or SILENT)
    if options.tracer is not None:
        trace_session(session, options.tracer, f"{name or layout}: ", index * comm.Get_size())
    try:
        if decode:
            result = run_decode(session, batch, work.new_tokens, work.eos_id, collect=True)
        else:
            result = run_prefill(session, batch, options.warmup, options.iters, collect=True)
        report = build_report(session, batch, result)
    finally:
        session.close()
    return result.outputs, report


def compare_outputs(ep: dict, baseline: dict, dtype: str) -> dict:
    """How far the EP outputs are from the baseline's, and whether that is agreement
    (see the module docstring for the criteria)."""
    rtol = RTOL[dtype]
    out: dict = {"dtype": dtype, "rtol": rtol}
    agree = True
    for key in ("logits", "hidden"):
        if key in ep and key in baseline:
            err = relative_error(ep[key], baseline[key])
            out[f"{key}_rel_err"] = err
            out[f"{key}_max_abs_diff"] = float(np.max(np.abs(
                ep[key].astype(np.float64) - baseline[key].astype(np.float64))))
            agree &= err <= rtol
    counts_a, counts_b = ep["expert_counts"], baseline["expert_counts"]
    differing = int(np.count_nonzero(counts_a != counts_b))
    out["expert_counts_identical"] = differing == 0
    out["expert_counts_differing"] = differing
    out["expert_counts_max_abs_diff"] = int(np.max(np.abs(counts_a - counts_b)))
    strict = dtype == "float32"
    if strict:
        agree &= differing == 0
    if "tokens" in ep and "tokens" in baseline:
        same = ep["tokens"] == baseline["tokens"]
        out["tokens_identical_fraction"] = float(same.mean())
        if strict:
            agree &= bool(same.all())
    identical = "expert_counts and tokens" if "tokens" in ep else "expert_counts"
    out["criteria"] = (f"logits and hidden relative L2 error <= {rtol:g}"
                       + (f"; {identical} identical" if strict else
                          " (bfloat16: routing may differ on near-ties; counts reported)"))
    out["agree"] = bool(agree)
    return out


def _side_by_side(ep: dict, baseline: dict, key: str = "phases_ms") -> dict:
    """{phase: {"ep_ms", "baseline_ms"}}: each the max over ranks (what a bulk-synchronous
    loop waits for), phases in the engine's order."""
    from ..core.phases import PHASES

    names = [p for p in PHASES if p in ep[key] or p in baseline[key]]
    return {p: {"ep_ms": ep[key].get(p, {}).get("max", 0.0),
                "baseline_ms": baseline[key].get(p, {}).get("max", 0.0)} for p in names}


def summarize(ep_layout: Layout, baseline_layout: Layout, ep_report: dict,
              baseline_report: dict, outputs: dict) -> dict:
    """The comparison block of the JSON: layouts, throughput, ratio, phases, outputs."""
    ep_rate, base_rate = ep_report["tokens_per_s"], baseline_report["tokens_per_s"]
    summary = {
        "ep_layout": layout_name(ep_layout, False),
        "baseline_layout": layout_name(baseline_layout, True),
        "ep_tokens_per_s": ep_rate,
        "baseline_tokens_per_s": base_rate,
        "ratio_ep_over_baseline": ep_rate / base_rate if base_rate else float("inf"),
        "ep_wall_s": ep_report["wall_s"],
        "baseline_wall_s": baseline_report["wall_s"],
        "phases_max_ms": _side_by_side(ep_report, baseline_report),
        "outputs": outputs,
    }
    if "decode" in ep_report and "decode" in baseline_report:
        ep_dec, base_dec = ep_report["decode"], baseline_report["decode"]
        summary["decode"] = {
            "ep_per_token_ms": ep_dec["per_token_ms"].get("mean"),
            "baseline_per_token_ms": base_dec["per_token_ms"].get("mean"),
            "ep_tokens_per_s": ep_dec["decode_tokens_per_s"],
            "baseline_tokens_per_s": base_dec["decode_tokens_per_s"],
        }
    return summary


def run_compare(config: RunConfig, comm, batch, ep_layout: str | None = None,
                baseline_layout: str | None = None,
                options: RunOptions | None = None) -> dict | None:
    """Run both deployments one after the other on ``comm``. Collective.

    Returns on rank 0 ``{"world_size", "ep": report, "baseline": report, "comparison":
    summary}`` (reports as ``spmd-moe run --report`` writes them); ``None`` elsewhere.
    A layout that cannot work raises :class:`LayoutError` on every rank before anything
    runs.
    """
    options = options or RunOptions()
    size = comm.Get_size()
    ep, baseline = collective(comm, resolve_layouts, config.model, size, ep_layout,
                              baseline_layout)
    # The config's own layout (paper-baseline names one) must not override either run.
    config = replace(config, layout=None)
    ep_out, ep_report = run_deployment(config, comm, batch, ep, options, 0,
                                       layout_name(ep, False))
    base_out, base_report = run_deployment(config, comm, batch, baseline, options, 1,
                                           layout_name(baseline, True))
    if comm.Get_rank() != 0:
        return None
    outputs = compare_outputs(ep_out, base_out, config.model.dtype)
    return {"world_size": size, "ep": ep_report, "baseline": base_report,
            "comparison": summarize(ep, baseline, ep_report, base_report, outputs)}


# --- printing --------------------------------------------------------------------------

def format_comparison(result: dict) -> str:
    """The table rank 0 prints."""
    ep, base, comp = result["ep"], result["baseline"], result["comparison"]
    out = comp["outputs"]
    ep_name, base_name = comp["ep_layout"], comp["baseline_layout"]
    width = max(12, len(ep_name), len(base_name)) + 2
    lines = [
        f"spmd-moe compare: {ep['workload']} of {ep['batch_size']} x {ep['seq_len']} "
        f"({ep['tokens']} real tokens) on {result['world_size']} rank(s), "
        f"{out['dtype']}, backend {ep['backend']['name']}, transport {ep['transport']['name']}",
        f"  {'deployment':<18}{'layout':<{width}}{'wall ms':>10}{'tokens/s':>14}",
        f"  {'expert parallel':<18}{ep_name:<{width}}{ep['wall_s'] * 1e3:>10.1f}"
        f"{ep['tokens_per_s']:>14,.0f}",
        f"  {'TPxPP baseline':<18}{base_name:<{width}}{base['wall_s'] * 1e3:>10.1f}"
        f"{base['tokens_per_s']:>14,.0f}",
        f"  ratio EP/baseline (tokens/s): {comp['ratio_ep_over_baseline']:.2f}x",
    ]
    if "decode" in comp:
        dec = comp["decode"]
        lines.append(f"  decode per token: EP {dec['ep_per_token_ms'] or 0:.2f} ms, baseline "
                     f"{dec['baseline_per_token_ms'] or 0:.2f} ms")
    numbers = [f"{key} rel err {out[key + '_rel_err']:.2e}" for key in ("logits", "hidden")
               if key + "_rel_err" in out]
    counts = ("expert_counts identical" if out["expert_counts_identical"] else
              f"expert_counts differ in {out['expert_counts_differing']} entries "
              f"(max {out['expert_counts_max_abs_diff']})")
    tokens = ([f"tokens identical {out['tokens_identical_fraction'] * 100:.1f}%"]
              if "tokens_identical_fraction" in out else [])
    lines.append(f"  outputs: {'agree' if out['agree'] else 'DISAGREE'} ("
                 + ", ".join(numbers + [counts] + tokens) + f"; {out['criteria']})")
    lines.append(f"  {'phase (max over ranks)':<24}{ep_name:>{width}}{base_name:>{width}}")
    for phase, times in comp["phases_max_ms"].items():
        lines.append(f"  {phase:<24}{times['ep_ms']:>{width - 3}.3f} ms"
                     f"{times['baseline_ms']:>{width - 3}.3f} ms")
    for name, report in (("EP", ep), ("baseline", base)):
        pipe, over = report["pipeline"], report["overlap"]
        chunk = (f"chunks of <= {pipe['chunk_tokens']} tokens" if pipe["chunk_tokens"]
                 else "whole sequences")
        idle = max(st["idle_fraction"] for st in pipe["stage_idle"])
        lines.append(f"  {name} schedule: {chunk}, {pipe['stages']} stage(s) x "
                     f"{pipe['micro_batches']} micro-batch(es), ideal bubble "
                     f"{pipe['bubble_fraction_ideal'] * 100:.0f}%, measured idle <= "
                     f"{idle * 100:.0f}% per stage; overlap {over['reason']}, hidden "
                     f"{over['hidden_ms']['mean']:.1f} ms per rank")
    return "\n".join(lines)


# --- the command -----------------------------------------------------------------------

def add_parser(commands) -> None:
    from .options import add_config_arguments, add_execution_arguments

    parser = commands.add_parser(
        "compare", help="run the expert-parallel deployment and the TPxPP baseline on the "
                        "same workload in one job; outputs checked, times side by side")
    add_config_arguments(parser)
    group = parser.add_argument_group("the two deployments")
    group.add_argument("--ep-layout", help="ep=N[,pp=M] (default: ep = world size, or the "
                                           "largest ep that fits the model)")
    group.add_argument("--baseline-layout", help="tp=N[,pp=M] (default: the largest tp "
                                                 "dividing world size, n_heads and d_ff)")
    add_execution_arguments(parser)   # --report: both reports and the comparison
    parser.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from mpi4py import MPI

    from .options import (gather_trace, load_batch, memory_limit_bytes, on_rank_0, plan_workload,
                          progress_reporter, start_trace)
    from ..core.files import text_writer, write_files
    from .report import report_json
    from ..engine.runner import plan_session

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    def no_layout(args) -> None:
        if args.layout:
            raise ConfigError("--layout", "compare runs two layouts: use --ep-layout and "
                                          "--baseline-layout")

    planned = plan_workload(comm, args, no_layout)
    config = planned.config
    options = RunOptions(args.backend, args.transport, args.warmup, args.iters,
                         memory_limit_bytes(args), args.watchdog,
                         progress=progress_reporter(comm, args))
    # Both deployments' checks (memory included) before the batch is built or read.
    for layout in collective(comm, resolve_layouts, config.model, comm.Get_size(),
                             args.ep_layout, args.baseline_layout):
        plan_session(replace(config, layout=None), comm, planned.lengths, str(layout),
                     options.backend, options.transport, planned.new_tokens,
                     options.memory_limit, options.watchdog).close()
    batch = load_batch(comm, planned, args.watchdog)
    options.tracer = start_trace(comm, args)
    result = run_compare(config, comm, batch, args.ep_layout, args.baseline_layout, options)
    trace = gather_trace(comm, args, options.tracer)
    agree = None

    def write_outputs() -> None:
        files = []
        if args.report:
            files.append((args.report, "--report",
                          text_writer(report_json(result))))
        if args.trace:
            files.append((args.trace, "--trace", text_writer(trace)))
        write_files(files)

    if args.report or args.trace:
        with args.watchdog.waiting("write outputs"):
            on_rank_0(comm, args.watchdog, "writing outputs", write_outputs)
    if rank == 0:
        print(format_comparison(result), flush=True)
        agree = result["comparison"]["outputs"]["agree"]
        if not agree:
            say("spmd-moe: error: compare: the two deployments' outputs disagree beyond "
                "the tolerance above")
    agree = comm.bcast(agree, root=0)
    return 0 if agree else 1
