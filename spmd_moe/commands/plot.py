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

matplotlib is an optional extra (``pip install 'spmd-moe[plot]'``); without it the command
says so in one line. The Agg backend renders without a display.
"""
from __future__ import annotations

import json
import os
import stat

from ..core.errors import ConfigError, InputError

MAX_INPUT_BYTES = 1 << 30
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


def read_json(path: str) -> dict:
    """A report or trace file: a regular file of at most 1 GiB of JSON object."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise InputError("REPORT", f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError("REPORT", f"{path} is not a regular file")
    if info.st_size > MAX_INPUT_BYTES:
        raise InputError("REPORT", f"{path} is larger than 1 GiB")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError("REPORT", f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError("REPORT", f"{path} is not a spmd-moe report or trace")
    return data


def deployments(data: dict, path: str = "REPORT") -> list[tuple[str, dict]]:
    """``[(title, run report)]``: one for a run report, the two of a compare report."""
    if "comparison" in data and "ep" in data and "baseline" in data:
        comp = data["comparison"]
        parts = [(f"expert parallel {comp.get('ep_layout', '')}", data["ep"]),
                 (f"baseline {comp.get('baseline_layout', '')}", data["baseline"])]
    else:
        parts = [(f"{data.get('workload', 'run')} {data.get('layout', '')}", data)]
    for title, report in parts:
        for key in ("per_rank", "expert_counts"):
            if key not in report:
                raise InputError("REPORT", f"{path}: not a spmd-moe report with {key} (run "
                                           "or compare --report of this version, or a "
                                           "--trace file)")
    return parts


def panels_of(report: dict) -> list[str]:
    kinds = ["phases", "experts"]
    if report.get("decode", {}).get("step_ms"):
        kinds.append("decode")
    return kinds


def plot_phases(ax, report: dict) -> None:
    """Per rank, stacked mean ms per phase (per_rank.phases_ms: a column per phase)."""
    columns = report["per_rank"]
    ranks = list(range(len(columns["stage"])))
    bottoms = [0.0] * len(ranks)
    for phase, column in columns["phases_ms"].items():
        heights = [ms or 0.0 for ms in column]          # null: the rank has no such phase
        ax.bar(ranks, heights, bottom=bottoms, label=phase, width=0.8,
               color=PHASE_COLORS.get(phase))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(ranks)
    ax.set_xticklabels([f"{r}\ns{columns['stage'][r]}/g{columns['group_rank'][r]}"
                        for r in ranks], fontsize=7)
    ax.set_xlabel("rank (stage / expert- or tensor-rank)")
    ax.set_ylabel("ms per iteration")
    ax.set_title("time per phase, by rank", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper right")


def plot_experts(ax, report: dict) -> None:
    """Routed rows per (layer, expert), all ranks."""
    counts = report["expert_counts"]
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
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


def trace_figure(data: dict, path: str = "TRACE", start_ms: float | None = None,
                 end_ms: float | None = None):
    """A timeline of a ``--trace`` file: a row per (rank, thread), a bar per span."""
    Figure = load_matplotlib()
    events = data.get("traceEvents")
    if not isinstance(events, list):
        raise InputError("REPORT", f"{path}: not a Chrome trace (no traceEvents)")
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    if start_ms is None:
        iterations = [e for e in spans if e["tid"] == 0 and e["name"].startswith("iteration")]
        first = iterations[-1] if iterations else None
        start_ms = first["ts"] / 1e3 if first else 0.0
        end_ms = (first["ts"] + first["dur"]) / 1e3 if first else None
    rows = sorted({(e["pid"], e["tid"]) for e in spans if e["tid"] > 0})
    fig = Figure(figsize=(11, 0.42 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    seen: set[str] = set()
    for y, (pid, tid) in enumerate(rows):
        for e in spans:
            if (e["pid"], e["tid"]) != (pid, tid):
                continue
            begin, width = e["ts"] / 1e3, e["dur"] / 1e3
            if begin + width < start_ms or (end_ms is not None and begin > end_ms):
                continue
            label = None if e["name"] in seen else e["name"]
            seen.add(e["name"])
            ax.broken_barh([(begin - start_ms, width)], (y - 0.4, 0.8),
                           facecolors=PHASE_COLORS.get(e["name"], "#7f7f7f"), label=label)
            micro = (e.get("args") or {}).get("micro_batch")
            if micro is not None and e["name"] == "attention" and width > 0:
                ax.text(begin - start_ms + width / 2, y, str(micro), ha="center",
                        va="center", fontsize=5, color="white")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{processes.get(pid, pid)} | {threads.get((pid, tid), tid)}"
                        for pid, tid in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("ms from the start of the iteration")
    ax.legend(fontsize=6, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title("trace timeline (numbers: micro-batch)", fontsize=9)
    return fig


def figure_for(path: str):
    data = read_json(path)
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
    from ..core.files import check_output_path, write_files

    check_output_path(args.output, "--output")
    load_matplotlib()
    fig = figure_for(args.report)
    write_files([(args.output, "--output", png_writer(fig))])
    return 0
