"""``spmd-moe plot``: every plot kind rendered from real reports, and its refusals."""
from __future__ import annotations

import json
import sys

import pytest
from mpi4py import MPI
from test_cli import spmd_moe

from spmd_moe.commands import cli, plot
from spmd_moe.commands.report import build_report
from spmd_moe.core.config import build_run_config
from spmd_moe.core.trace import Tracer
from spmd_moe.engine.runner import open_session, run_decode, run_prefill, trace_session
from spmd_moe.model.inputs import synthetic_input

PNG = b"\x89PNG\r\n\x1a\n"


def one_process_report(workload: str = "prefill", tracer: Tracer | None = None) -> dict:
    config = build_run_config("tiny", workload=workload,
                              new_tokens=6 if workload == "decode" else None)
    batch = synthetic_input(config.workload, config.model, config.seed)
    session = open_session(config, MPI.COMM_SELF, batch, backend="numpy",
                           new_tokens=6 if workload == "decode" else 0)
    if tracer is not None:
        trace_session(session, tracer)
    if workload == "decode":
        result = run_decode(session, batch, 6, collect=False)
    else:
        result = run_prefill(session, batch, iters=2, collect=False)
    report = build_report(session, batch, result)
    session.close()
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A prefill and a decode report (one process), and a trace, as files."""
    root = tmp_path_factory.mktemp("reports")
    tracer = Tracer(MPI.COMM_SELF)
    tracer.align()
    files = {"prefill": one_process_report("prefill", tracer),
             "decode": one_process_report("decode")}
    paths = {}
    for name, report in files.items():
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(report))
    paths["trace"] = root / "trace.json"
    paths["trace"].write_text(tracer.gather())
    return paths


def render(path, tmp_path, capsys=None) -> bytes:
    out = tmp_path / "out.png"
    assert cli.main(["plot", str(path), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    return data


def test_a_prefill_report_plots_phases_per_rank_and_the_expert_heatmap(reports, tmp_path):
    render(reports["prefill"], tmp_path)
    report = json.loads(reports["prefill"].read_text())
    fig = plot.report_figure(report)
    bars, heat = fig.axes[0], fig.axes[1]
    phases = report["per_rank"]["phases_ms"]
    # one bar segment per phase on the one rank, stacked to the rank's total
    assert len(bars.patches) == len(phases)
    top = max(p.get_y() + p.get_height() for p in bars.patches)
    assert top == pytest.approx(sum(column[0] or 0.0 for column in phases.values()))
    assert heat.images[0].get_array().shape == (5, 12)        # tiny: L=5, E=12
    assert (heat.images[0].get_array().sum(axis=1) == 55 * 2).all()   # k rows per token


def test_a_decode_report_adds_per_token_latency(reports, tmp_path):
    render(reports["decode"], tmp_path)
    report = json.loads(reports["decode"].read_text())
    assert len(report["decode"]["step_ms"]) == 5
    fig = plot.report_figure(report)
    line = next(ax for ax in fig.axes if ax.get_title() == "per-token latency").lines[0]
    assert list(line.get_ydata()) == report["decode"]["step_ms"]


def test_a_compare_report_puts_both_deployments_side_by_side(tmp_path):
    path = tmp_path / "compare.json"
    result = spmd_moe("compare", "--preset", "tiny", "--workload", "decode", "--new-tokens",
                      "4", "--report", str(path), ranks=2)
    assert result.returncode == 0, result.stderr
    render(path, tmp_path)
    fig = plot.report_figure(json.loads(path.read_text()))
    grid = fig.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (3, 2)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("expert parallel ep=2") for t in titles)
    assert any(t.startswith("baseline tp=2") for t in titles)


def test_a_trace_plots_its_timeline(reports, tmp_path):
    render(reports["trace"], tmp_path)


def test_without_matplotlib_one_line_names_the_package(reports, tmp_path, monkeypatch,
                                                       capsys):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import raises ImportError
    out = tmp_path / "out.png"
    assert cli.main(["plot", str(reports["prefill"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["spmd-moe: error: plot: needs matplotlib, which is not installed: pip "
                   "install 'spmd-moe[plot]' (or pip install matplotlib)"]
    assert not out.exists()


@pytest.mark.parametrize("content, needle", [
    ("not json", "is not valid JSON"),
    ('{"workload": "prefill"}', "not a spmd-moe report with per_rank"),
    ("[1, 2]", "not a spmd-moe report or trace"),
])
def test_a_bad_report_is_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    out = tmp_path / "out.png"
    assert cli.main(["plot", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("spmd-moe: error: REPORT: ") and needle in err[0]
    assert not out.exists()


def test_the_output_path_is_checked_before_plotting(reports, tmp_path, capsys):
    assert cli.main(["plot", str(reports["prefill"]), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spmd-moe: error: --output: ") and err.count("\n") == 1
    assert cli.main(["plot", str(tmp_path / "missing.json"), "-o",
                     str(tmp_path / "x.png")]) == 2
    assert "REPORT: cannot read" in capsys.readouterr().err


def test_report_json_keeps_number_lists_on_one_line(reports):
    from spmd_moe.commands.report import report_json

    report = json.loads(reports["decode"].read_text())
    text = report_json(report)
    assert json.loads(text) == report
    assert '"step_ms": [' in text and "\n        [" not in text
    rows = [line for line in text.splitlines() if line.strip().startswith("[")]
    assert len(rows) >= 5                      # expert_counts: a line per layer


# --- hostile files (issue #22) -------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    ('{"traceEvents": [{"ph": "X"}]}', "REPORT traceEvents[0] name: missing"),
    ('{"traceEvents": [{"ph": "X", "name": "a", "pid": 0, "tid": 1, "ts": "0", "dur": 1}]}',
     "REPORT traceEvents[0] ts: '0' must be a finite number"),
    ('{"traceEvents": [{"ph": "X", "name": "a", "pid": 0, "tid": 1, "ts": 0, "dur": -1}]}',
     "REPORT traceEvents[0] dur: -1 must be >= 0"),
    ('{"traceEvents": [{"ph": "M", "name": "thread_name", "pid": 0, "tid": 1}]}',
     "REPORT traceEvents[0] args: missing"),
    ('{"traceEvents": 5}', "REPORT traceEvents: 5 must be an array"),
    ('{"per_rank": {"stage": ["0"], "group_rank": [0], "phases_ms": {}}, '
     '"expert_counts": [[1]]}', "REPORT per_rank.stage: ['0'] must be an array of integers"),
    ('{"per_rank": {"stage": [0], "group_rank": [0], "phases_ms": {"a": [1, 2]}}, '
     '"expert_counts": [[1]]}', "REPORT per_rank.phases_ms.a: has not one entry per rank"),
    ('{"per_rank": {"stage": [0], "group_rank": [0], "phases_ms": {}}, '
     '"expert_counts": [[1, 2], [3]]}', "REPORT expert_counts[1]: has 1 experts, row 0 has 2"),
    ('{"per_rank": {"stage": [0], "group_rank": [0], "phases_ms": {}}, '
     '"expert_counts": [[1]], "decode": {"step_ms": [1, "x"]}}',
     "REPORT decode.step_ms: [1, 'x'] must be an array of finite numbers"),
])
def test_the_schema_is_checked_before_anything_is_drawn(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    out = tmp_path / "out.png"
    assert cli.main(["plot", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"spmd-moe: error: {needle}"), err
    assert not out.exists()


def test_plot_never_writes_over_its_report(reports, tmp_path, capsys):
    copy = tmp_path / "r.json"
    copy.write_text(reports["prefill"].read_text())
    assert cli.main(["plot", str(copy), "-o", str(copy)]) == 2
    assert "--output: " in capsys.readouterr().err and json.loads(copy.read_text())


def test_a_big_trace_draws_the_busiest_rows_and_says_what_was_left_out():
    """3,000 rows took 49 s and 870 MB: the drawing is capped, the title says so."""
    events = [{"ph": "X", "name": "iteration 1", "pid": 0, "tid": 0, "ts": 0, "dur": 10_000}]
    for row in range(3000):
        for span in range(3):
            events.append({"ph": "X", "name": "attention", "pid": row // 4, "tid": 1 + row % 4,
                           "ts": span * 1000, "dur": 100 + row, "args": {"micro_batch": span}})
    fig = plot.trace_figure({"traceEvents": events})
    ax = fig.axes[0]
    assert len(ax.get_yticks()) == plot.MAX_TRACE_ROWS
    assert f"left out: {3000 - plot.MAX_TRACE_ROWS} quieter rows" in ax.get_title()
    # The busiest rows are the last ones (their spans are the longest).
    assert ax.get_yticklabels()[0].get_text().startswith(f"{(3000 - plot.MAX_TRACE_ROWS) // 4}")
    bars = sum(len(c.get_paths()) for c in ax.collections)
    assert bars == 3 * plot.MAX_TRACE_ROWS


def test_a_report_of_many_ranks_draws_the_slowest():
    ranks = plot.MAX_RANKS + 44
    report = {"per_rank": {"stage": [0] * ranks, "group_rank": list(range(ranks)),
                           "phases_ms": {"attention": [float(r) for r in range(ranks)]}},
              "expert_counts": [[1] * 8]}
    fig = plot.report_figure(report)
    assert len(fig.axes[0].patches) == plot.MAX_RANKS
    assert "(the 256 slowest of 300; 44 left out)" in fig.axes[0].get_title()
