"""``spmd-moe plot REPORT.json -o FILE.png``: a report (run or compare) or a trace as a PNG.

Panels, one column per deployment (a compare report has two, side by side):

- **phases per rank**: each rank's mean time per phase (ms per iteration), stacked, in the
  engine's phase order, so the tallest bar is the slowest rank and its segments say where
  the time went (``per_rank.phases_ms``);
- **expert load**: routed rows per layer and expert as a heatmap (``expert_counts``, all
  ranks' rows), the imbalance a router makes visible at a glance;
- **decode**: the wall time of each decode step (``decode.step_ms``), per-token latency
  over the generated tokens.

Given a trace (``--trace``'s JSON) instead, it draws the timeline: one row per rank and
Chrome thread (iterations, stage, slot 0, slot 1), a bar per span coloured by phase.

The file is read through the read door (core/files.py: a regular file of at most 256 MiB
of UTF-8 JSON) and its schema checked before anything is drawn: a field of the wrong type is
one line naming it. What is drawn is capped so that a big file takes bounded time: at most
MAX_RANKS ranks in the phase bars (the slowest), MAX_HEAT_CELLS cells in the heatmap
(experts binned), MAX_TRACE_ROWS timeline rows (the busiest) and MAX_TRACE_SPANS bars (the
longest); the figure says what was left out.

matplotlib is an optional extra (``pip install 'spmd-moe[plot]'``); without it the command
says so in one line. The Agg backend renders without a display.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..core.errors import ConfigError, InputError
from ..core.files import JsonFields, check_json, read_json

MAX_RANKS = 256              # phase bars drawn (the slowest ranks)
MAX_HEAT_CELLS = 1 << 20     # expert-load heatmap cells (experts summed into bins beyond)
MAX_TRACE_ROWS = 48          # timeline rows (the busiest in the window)
MAX_TRACE_SPANS = 20_000     # timeline bars (the longest in the window)
MAX_LABELS = 2_000           # micro-batch numbers written on bars
# Phase colours, fixed so two plots (and the two sides of a compare) read alike.
PHASE_COLORS = {
    "embed": "#8c564b", "stage_recv": "#d9d9d9", "attention": "#1f77b4",
    "attn_allreduce": "#aec7e8", "router": "#9467bd", "permute": "#c5b0d5",
    "count_exchange": "#ffbb78", "dispatch": "#ff7f0e", "experts": "#2ca02c",
    "combine": "#d62728", "unpermute": "#ff9896", "residual": "#17becf",
    "lm_head": "#bcbd22", "sample": "#dbdb8d", "stage_send": "#f7b6d2",
    "stage_drain": "#bdbdbd", "token_return": "#969696", "barrier": "#eeeeee",
    "device sync": "#cccccc",
}


def load_matplotlib():
    """The Agg-backed Figure class, or a ConfigError naming the missing package."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plot", "needs matplotlib, which is not installed: pip install "
                                  "'spmd-moe[plot]' (or pip install matplotlib)") from None
    return Figure


def read_report(path: str) -> dict:
    """A report or trace file through the read door, as a JSON object."""
    data = read_json(path, "REPORT", "report")
    if not isinstance(data, dict):
        raise InputError("REPORT", f"{path} is not a spmd-moe report or trace")
    return data


def check_run_report(report: JsonFields) -> None:
    """The fields a run report's panels draw, type-checked (and the per-rank columns of
    one length) before anything is drawn."""
    for key in ("per_rank", "expert_counts"):
        if key not in report:
            raise InputError("REPORT", f"{report.path}: not a spmd-moe report with {key} (run "
                                       "or compare --report of this version, or a --trace "
                                       "file)")
    columns = report.fields("per_rank")
    ranks = len(columns.get("stage", "integers"))
    for key in ("group_rank",):
        if len(columns.get(key, "integers")) != ranks:
            raise InputError(columns.field(key), f"has not one entry per rank ({ranks})")
    phases = columns.fields("phases_ms")
    for phase in phases.data:
        if len(phases.get(phase, "numbers_or_nulls")) != ranks:
            raise InputError(phases.field(phase), f"has not one entry per rank ({ranks})")
    counts = report.get("expert_counts", "array")
    for layer, row in enumerate(counts):
        check_json(row, "numbers", f"{report.field('expert_counts')}[{layer}]", report.path)
        if len(row) != len(counts[0]):
            raise InputError(f"{report.field('expert_counts')}[{layer}]",
                             f"has {len(row)} experts, row 0 has {len(counts[0])}")
    for index, row in enumerate(report.get("expert_load", "array", [])):
        JsonFields(row, f"{report.field('expert_load')}[{index}]", report.path).get(
            "max_over_mean", "number", 0.0)
    if "decode" in report:
        decode = report.fields("decode")
        decode.get("step_ms", "numbers", [])
        if "per_token_ms" in decode:
            decode.fields("per_token_ms").get("p50", "number")


def deployments(data: dict, path: str = "REPORT") -> list[tuple[str, dict]]:
    """``[(title, run report)]``: one for a run report, the two of a compare report; each
    checked (:func:`check_run_report`)."""
    fields = JsonFields(data, "REPORT", path)
    if "comparison" in data and "ep" in data and "baseline" in data:
        comp = fields.fields("comparison")
        parts = [(f"expert parallel {comp.get('ep_layout', 'string', '')}", "ep"),
                 (f"baseline {comp.get('baseline_layout', 'string', '')}", "baseline")]
    else:
        parts = [(f"{fields.get('workload', 'string', 'run')} "
                  f"{fields.get('layout', 'string', '')}", None)]
    checked = []
    for title, key in parts:
        report = fields.fields(key) if key else fields
        check_run_report(report)
        checked.append((title, report.data))
    return checked


def panels_of(report: dict) -> list[str]:
    kinds = ["phases", "experts"]
    if report.get("decode", {}).get("step_ms"):
        kinds.append("decode")
    return kinds


def plot_phases(ax, report: dict) -> None:
    """Per rank, stacked mean ms per phase (per_rank.phases_ms: a column per phase); the
    MAX_RANKS slowest ranks when there are more."""
    columns = report["per_rank"]
    phases = {phase: np.array([ms or 0.0 for ms in column])   # null: no such phase
              for phase, column in columns["phases_ms"].items()}
    total = sum(phases.values(), np.zeros(len(columns["stage"])))
    shown = np.arange(len(total))
    if len(shown) > MAX_RANKS:
        shown = np.sort(np.argsort(-total, kind="stable")[:MAX_RANKS])
    place = np.arange(len(shown))
    bottoms = np.zeros(len(shown))
    for phase, column in phases.items():
        ax.bar(place, column[shown], bottom=bottoms, label=phase, width=0.8,
               color=PHASE_COLORS.get(phase))
        bottoms += column[shown]
    ax.set_xticks(place)
    ax.set_xticklabels([f"{r}\ns{columns['stage'][r]}/g{columns['group_rank'][r]}"
                        for r in shown], fontsize=7 if len(shown) <= 32 else 4)
    ax.set_xlabel("rank (stage / expert- or tensor-rank)")
    ax.set_ylabel("ms per iteration")
    left_out = len(total) - len(shown)
    ax.set_title("time per phase, by rank" + (f" (the {len(shown)} slowest of {len(total)}; "
                                              f"{left_out} left out)" if left_out else ""),
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper right")


def plot_experts(ax, report: dict) -> None:
    """Routed rows per (layer, expert), all ranks; experts summed into bins when the map
    would exceed MAX_HEAT_CELLS."""
    counts = np.array(report["expert_counts"], dtype=np.float64).reshape(
        len(report["expert_counts"]), -1)
    layers, experts = counts.shape
    per_bin = max(1, -(-layers * experts // MAX_HEAT_CELLS))
    if per_bin > 1:
        counts = np.add.reduceat(counts, np.arange(0, experts, per_bin), axis=1)
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert" if per_bin == 1 else f"expert bin ({per_bin} experts each)")
    ax.set_ylabel("layer")
    load = report.get("expert_load") or []
    worst = max((row.get("max_over_mean", 0.0) for row in load), default=0.0)
    ax.set_title(f"expert load (rows routed; worst max/mean {worst:.2f})", fontsize=9)
    ax.figure.colorbar(image, ax=ax, label="rows")


def plot_decode(ax, report: dict) -> None:
    """Wall time of each decode step."""
    steps = report["decode"]["step_ms"]
    ax.plot(range(1, len(steps) + 1), steps, marker="." if len(steps) < 200 else None,
            linewidth=1)
    ax.set_xlabel("decode step")
    ax.set_ylabel("ms per token")
    per = report["decode"].get("per_token_ms") or {}
    if per:
        ax.axhline(per["p50"], color="grey", linestyle="--", linewidth=0.8, label="p50")
        ax.legend(fontsize=7)
    ax.set_title("per-token latency", fontsize=9)
    ax.set_ylim(bottom=0)


def report_figure(data: dict, path: str = "REPORT"):
    """The report's figure (a matplotlib Figure on the Agg backend)."""
    Figure = load_matplotlib()
    parts = deployments(data, path)
    kinds = sorted({k for _, r in parts for k in panels_of(r)},
                   key=["phases", "experts", "decode"].index)
    fig = Figure(figsize=(6.5 * len(parts), 3.6 * len(kinds)), layout="constrained")
    axes = fig.subplots(len(kinds), len(parts), squeeze=False)
    draw = {"phases": plot_phases, "experts": plot_experts, "decode": plot_decode}
    for column, (title, report) in enumerate(parts):
        for row, kind in enumerate(kinds):
            ax = axes[row][column]
            if kind in panels_of(report):
                draw[kind](ax, report)
            else:
                ax.set_axis_off()
        axes[0][column].set_title(f"{title}\n" + axes[0][column].get_title(), fontsize=9)
    return fig


def trace_events(data: dict, path: str) -> tuple[dict, dict, list[dict]]:
    """A trace's thread names ``{(pid, tid): name}``, process names ``{pid: name}`` and
    complete spans (``ph`` X), every field drawn type-checked first."""
    events = JsonFields(data, "REPORT", path).get("traceEvents", "array")
    threads, processes, spans = {}, {}, []
    for index, event in enumerate(events):
        event = JsonFields(event, f"REPORT traceEvents[{index}]", path)
        kind = event.get("ph", "string", "")
        if kind == "M" and event.get("name", "string", "") in ("thread_name", "process_name"):
            name = event.fields("args").get("name", "string")
            if event.data["name"] == "thread_name":
                threads[event.get("pid", "integer"), event.get("tid", "integer")] = name
            else:
                processes[event.get("pid", "integer")] = name
        elif kind == "X":
            for key, of in (("name", "string"), ("pid", "integer"), ("tid", "integer"),
                            ("ts", "number"), ("dur", "number")):
                event.get(key, of)
            if event.data["dur"] < 0:
                raise InputError(event.field("dur"), f"{event.data['dur']} must be >= 0 "
                                                     f"({path})")
            event.get("args", "object", None)
            spans.append(event.data)
    return threads, processes, spans


def trace_figure(data: dict, path: str = "TRACE", start_ms: float | None = None,
                 end_ms: float | None = None):
    """A timeline of a ``--trace`` file: a row per (rank, thread), a bar per span; at most
    MAX_TRACE_ROWS rows (the busiest in the window) and MAX_TRACE_SPANS bars (the
    longest), the title saying what was left out."""
    Figure = load_matplotlib()
    threads, processes, spans = trace_events(data, path)
    if start_ms is None:
        iterations = [e for e in spans if e["tid"] == 0 and e["name"].startswith("iteration")]
        first = iterations[-1] if iterations else None
        start_ms = first["ts"] / 1e3 if first else 0.0
        end_ms = (first["ts"] + first["dur"]) / 1e3 if first else None
    by_row: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for e in spans:
        begin = e["ts"] / 1e3
        if e["tid"] > 0 and begin + e["dur"] / 1e3 >= start_ms and (
                end_ms is None or begin <= end_ms):
            by_row[e["pid"], e["tid"]].append(e)
    rows = sorted(by_row, key=lambda row: -sum(e["dur"] for e in by_row[row]))
    rows_left = max(0, len(rows) - MAX_TRACE_ROWS)
    rows = sorted(rows[:MAX_TRACE_ROWS])
    drawn = [e for row in rows for e in by_row[row]]
    spans_left = max(0, len(drawn) - MAX_TRACE_SPANS)
    if spans_left:
        drawn = sorted(drawn, key=lambda e: -e["dur"])[:MAX_TRACE_SPANS]
    fig = Figure(figsize=(11, 0.42 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    bars: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    place = {row: y for y, row in enumerate(rows)}
    for e in drawn:
        bars[place[e["pid"], e["tid"]], e["name"]].append((e["ts"] / 1e3 - start_ms,
                                                           e["dur"] / 1e3))
    seen: set[str] = set()
    for (y, name), ranges in sorted(bars.items()):
        ax.broken_barh(ranges, (y - 0.4, 0.8), facecolors=PHASE_COLORS.get(name, "#7f7f7f"),
                       label=None if name in seen else name)
        seen.add(name)
    if len(drawn) <= MAX_LABELS:
        for e in drawn:
            micro = (e.get("args") or {}).get("micro_batch")
            if micro is not None and e["name"] == "attention" and e["dur"] > 0:
                ax.text(e["ts"] / 1e3 - start_ms + e["dur"] / 2e3, place[e["pid"], e["tid"]],
                        str(micro), ha="center", va="center", fontsize=5, color="white")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{processes.get(pid, pid)} | {threads.get((pid, tid), tid)}"
                        for pid, tid in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("ms from the start of the iteration")
    if seen:
        ax.legend(fontsize=6, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    left = [f"{rows_left} quieter rows" if rows_left else "",
            f"{spans_left} shorter spans" if spans_left else ""]
    left = [part for part in left if part]
    ax.set_title("trace timeline (numbers: micro-batch)"
                 + (f"; left out: {', '.join(left)}" if left else ""), fontsize=9)
    return fig


def figure_for(path: str):
    data = read_report(path)
    if "traceEvents" in data:
        return trace_figure(data, path)
    return report_figure(data, path)


def png_writer(fig):
    return lambda out: fig.savefig(out, format="png", dpi=110)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "plot", help="PNG of a run or compare --report (phases per rank, expert-load "
                     "heatmap, decode latency) or of a --trace timeline")
    parser.add_argument("report", metavar="REPORT.json",
                        help="a --report of run or compare, or a --trace file")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.png",
                        help="the PNG to write")
    parser.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from ..core.files import check_output_paths, write_files

    check_output_paths((args.output, "--output"), inputs=((args.report, "REPORT"),))
    load_matplotlib()
    fig = figure_for(args.report)
    write_files([(args.output, "--output", png_writer(fig))])
    return 0
