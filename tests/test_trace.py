"""``--trace``: Chrome trace-event JSON of every rank (spmd_moe/core/trace.py).

The 4-rank tests shell out to the CLI (a chunked two-stage pipeline with two micro-batches
in flight) and read the file as Perfetto would: valid trace events, one process per rank
named with its stage and expert- or tensor-rank, every phase the report times on every
rank, the two overlap slots as two rows, and spans of one row properly nested.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from mpi4py import MPI
from test_cli import spmd_moe

from spmd_moe.backend.array import Backend, choose_backend
from spmd_moe.core.config import build_run_config
from spmd_moe.core.trace import (SLOT_TID, SPANS_PER_LAYER, STAGE_TID, SpanContext, Tracer,
                                 chrome_json)
from spmd_moe.engine.runner import open_session, run_decode, run_prefill, trace_session
from spmd_moe.model.inputs import synthetic_input


def check_chrome_trace(data: dict) -> list[dict]:
    """What chrome://tracing and Perfetto need of a trace (object form), asserted; returns
    its complete ("X") events."""
    assert isinstance(data["traceEvents"], list) and data["traceEvents"]
    for event in data["traceEvents"]:
        for key in ("ph", "ts", "pid", "tid", "name"):
            assert key in event, event
        assert event["ph"] in ("X", "M"), event
        assert isinstance(event["ts"], (int, float)) and event["ts"] >= 0, event
        if event["ph"] == "X":
            assert isinstance(event["dur"], (int, float)) and event["dur"] >= 0, event
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    # Within one row (pid, tid) spans nest: each starts after the enclosing one started and
    # ends before it ends, or starts after it ended. (1 ns of slack: times are rounded.)
    rows = defaultdict(list)
    for e in spans:
        rows[e["pid"], e["tid"]].append(e)
    for row, events in rows.items():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_ends: list[float] = []
        for e in events:
            while open_ends and e["ts"] >= open_ends[-1] - 1e-3:
                open_ends.pop()
            end = e["ts"] + e["dur"]
            if open_ends:
                assert end <= open_ends[-1] + 1e-3, (row, e)
            open_ends.append(end)
    return spans


def names_of(data: dict, kind: str) -> dict[int, str]:
    return {e["pid"]: e["args"]["name"] for e in data["traceEvents"]
            if e["ph"] == "M" and e["name"] == kind}


def test_a_pipelined_4_rank_trace_has_every_rank_and_phase(tmp_path):
    trace, report = tmp_path / "run.trace.json", tmp_path / "report.json"
    result = spmd_moe("run", "--preset", "tiny", "--layout", "ep=2,pp=2", "--chunk-tokens",
                      "4", "--overlap", "--iters", "2", "--trace", str(trace), "--report",
                      str(report), ranks=4)
    assert result.returncode == 0, result.stderr
    data = json.loads(trace.read_text())
    spans = check_chrome_trace(data)
    rep = json.loads(report.read_text())
    processes = names_of(data, "process_name")
    assert processes == {r: f"rank {r}: stage {r // 2}, expert-rank {r % 2}" for r in range(4)}
    sort = {e["pid"]: e["args"]["sort_index"] for e in data["traceEvents"]
            if e["name"] == "process_sort_index"}
    assert sort == {r: r for r in range(4)}
    micro = rep["pipeline"]["micro_batches"]
    assert micro >= 4 and rep["overlap"]["enabled"]
    n_layers = rep["config"]["model"]["n_layers"]
    for rank in range(4):
        mine = [e for e in spans if e["pid"] == rank]
        phases = {e["name"] for e in mine if e["tid"] >= STAGE_TID}
        # Every phase the report timed on this rank is in the trace, and nothing else.
        timed = {p for p, ms in rep["per_rank"]["phases_ms"].items() if ms[rank] is not None}
        assert phases == timed, rank
        # Two micro-batches in flight: both slots are rows of their own.
        assert {e["tid"] for e in mine} == {0, STAGE_TID, SLOT_TID, SLOT_TID + 1}
        iterations = [e for e in mine if e["tid"] == 0 and e["name"].startswith("iteration")]
        assert [e["name"] for e in iterations] == ["iteration 1", "iteration 2"]
        stage = rank // 2
        start = stage * (n_layers // 2) + min(stage, n_layers % 2)
        layers = range(start, start + n_layers // 2 + (stage < n_layers % 2))
        seen = defaultdict(int)
        for e in mine:
            if e["tid"] < SLOT_TID:
                continue
            args = e["args"]
            assert e["tid"] == SLOT_TID + args["micro_batch"] % 2 == SLOT_TID + args["slot"]
            assert 0 <= args["micro_batch"] < micro and args["rows"] >= 0
            if e["name"] in ("attention", "experts", "dispatch", "combine"):
                assert args["layer"] in layers, (rank, e)
            if "layer" in args:
                which = next(i for i, it in enumerate(iterations)
                             if it["ts"] <= e["ts"] <= it["ts"] + it["dur"])
                seen[which, args["micro_batch"], args["layer"]] += 1
            if e["name"] == "dispatch" and args.get("bytes"):
                assert args["bytes"] % rep["config"]["model"]["d_model"] == 0
        # every (iteration, micro-batch, layer) of the stage, within the planned bound
        assert {(m, layer) for _, m, layer in seen} == {(m, layer) for m in range(micro)
                                                       for layer in layers}
        # A micro-batch's spans per layer vary with timing (each poke of a pending exchange
        # between the other micro-batch's phases is a span: 11 to 25 seen), so the plan's
        # per-layer figure is what an iteration stays within, not each (micro-batch, layer).
        for it in range(len(iterations)):
            made = sum(n for (which, _, _), n in seen.items() if which == it)
            assert made <= micro * len(layers) * SPANS_PER_LAYER, (rank, it, made)
        if stage == 1:      # the pipeline's idle waits are visible
            assert any(e["name"] == "stage_recv" and e["dur"] > 0 for e in mine)
        else:
            assert any(e["name"] == "stage_send" and e["args"].get("bytes") for e in mine)
    assert any(e["name"] == "dispatch" and e["args"].get("bytes") for e in spans)
    meta = data["otherData"]
    assert meta["clock"]["hosts"] == 1
    assert meta["clock"]["barrier_exit_spread_us"]["max"] >= 0
    assert "truncated" not in meta


def test_a_trace_of_decode_and_of_the_tp_baseline(tmp_path):
    trace = tmp_path / "t.json"
    result = spmd_moe("run", "--preset", "tiny", "--layout", "tp=2,pp=2", "--workload",
                      "decode", "--new-tokens", "3", "--trace", str(trace), ranks=4)
    assert result.returncode == 0, result.stderr
    data = json.loads(trace.read_text())
    spans = check_chrome_trace(data)
    assert names_of(data, "process_name")[3] == "rank 3: stage 1, tensor-rank 1"
    host = [e["name"] for e in spans if e["pid"] == 0 and e["tid"] == 0]
    assert "prefill" in host and "decode step 1" in host and "decode step 2" in host
    assert {"attn_allreduce", "token_return"} <= {e["name"] for e in spans if e["pid"] == 0}


def test_compare_traces_both_deployments(tmp_path):
    trace = tmp_path / "c.json"
    result = spmd_moe("compare", "--preset", "tiny", "--dtype", "float32", "--trace",
                      str(trace), ranks=2)
    assert result.returncode == 0, result.stderr
    data = json.loads(trace.read_text())
    spans = check_chrome_trace(data)
    names = names_of(data, "process_name")
    assert names == {0: "ep=2,pp=1: rank 0: stage 0, expert-rank 0",
                     1: "ep=2,pp=1: rank 1: stage 0, expert-rank 1",
                     2: "tp=2,pp=1: rank 0: stage 0, tensor-rank 0",
                     3: "tp=2,pp=1: rank 1: stage 0, tensor-rank 1"}
    first = max(e["ts"] + e["dur"] for e in spans if e["pid"] < 2 and e["tid"] > 0)
    second = min(e["ts"] for e in spans if e["pid"] >= 2 and e["tid"] > 0)
    assert first <= second    # one after the other, on one clock
    assert {e["pid"] for e in spans if e["name"] == "dispatch"} == {0, 1}


def test_bench_traces_the_layer_step(tmp_path):
    trace = tmp_path / "b.json"
    result = spmd_moe("bench", "--seqs", "2", "--seq-len", "8", "--d-model", "16",
                      "--heads", "2", "--d-ff", "32", "--experts", "4", "--top-k", "2",
                      "--iters", "2", "--warmup", "0", "--peer", "none", "--trace",
                      str(trace), "--quiet")
    assert result.returncode == 0, result.stderr
    data = json.loads(trace.read_text())
    spans = check_chrome_trace(data)
    assert {"step", "attention", "router", "experts"} <= {e["name"] for e in spans}
    assert [e["name"] for e in spans if e["tid"] == 0] == ["iteration 1", "iteration 2"]


@pytest.mark.parametrize("bad", ["dir", "same"])
def test_a_bad_trace_path_is_one_line_and_no_output(tmp_path, bad):
    out = tmp_path / "out.npz"
    path = tmp_path if bad == "dir" else out
    result = spmd_moe("run", "--preset", "tiny", "--output", str(out), "--trace", str(path),
                      ranks=2)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("spmd-moe:")]
    assert len(lines) == 1 and "--trace" in lines[0], result.stderr
    assert not out.exists()


# --- in one process -----------------------------------------------------------------------

def test_the_span_limit_bounds_memory_and_is_noted(capsys):
    """A trace too long for its limit keeps the limit's spans, says so before running (rank
    0) and in the file's metadata, and counts what it dropped."""
    config = build_run_config("tiny", chunk_tokens=3)
    batch = synthetic_input(config.workload, config.model, config.seed)
    session = open_session(config, MPI.COMM_SELF, batch, backend="numpy")
    tracer = Tracer(MPI.COMM_SELF, limit=200)
    tracer.align()
    trace_session(session, tracer)
    run_prefill(session, batch, iters=3)
    session.close()
    assert "--trace: the schedule makes about" in capsys.readouterr().err
    assert len(tracer.events) == 200 and tracer.dropped > 0
    data = json.loads(tracer.gather())
    check_chrome_trace(data)
    meta = data["otherData"]["truncated"]
    assert meta["dropped_spans_by_rank"] == {"0": tracer.dropped} and meta["notes"]


def test_decode_in_one_process_names_micro_batches_and_layers():
    config = build_run_config("tiny", workload="decode", new_tokens=2)
    batch = synthetic_input(config.workload, config.model, config.seed)
    session = open_session(config, MPI.COMM_SELF, batch, backend="numpy", new_tokens=2)
    tracer = Tracer(MPI.COMM_SELF)
    tracer.align()
    trace_session(session, tracer)
    run_decode(session, batch, 2, collect=False)
    session.close()
    spans = check_chrome_trace(json.loads(tracer.gather()))
    layers = {e["args"]["layer"] for e in spans if e["name"] == "experts"}
    assert layers == set(range(config.model.n_layers))


def test_phase_timer_spans_merge_only_adjacent_phases_of_one_context():
    timer = Backend(choose_backend("numpy"), "float32").timer()
    timer.spans, timer.span_room = [], 4
    a, b = SpanContext(0, 0, 1, 5), SpanContext(1, 1, 1, 5)
    for name, context in [("attention", a), ("attention", a), ("router", a),
                          ("attention", b), ("attention", a), ("experts", a), ("x", a)]:
        timer.cursor.place(context)
        with timer.phase(name):
            pass
    timer.add_bytes("experts", 7)
    assert [(s[0], s[3]) for s in timer.spans] == [("attention", a), ("router", a),
                                                   ("attention", b), ("attention", a)]
    assert timer.span_dropped == 2       # experts and x: past the room of 4
    # An explicit context (an exchange's, when poked) wins over the running pass's.
    timer.spans, timer.span_room = [], 10
    with timer.phase("dispatch", a):
        pass
    timer.add_bytes("dispatch", 96)
    assert timer.spans[0][3] == a and timer.spans[0][4] == 96
    assert timer.seconds["attention"] > 0


def test_chrome_json_names_rows_and_notes_drops():
    text = chrome_json([{"events": [(0, 2, "attention", 1.5, 2.0, {"layer": 0})],
                         "processes": {0: "rank 0: stage 0, expert-rank 0"}, "dropped": 0},
                        {"events": [], "processes": {1: "rank 1"}, "dropped": 3}],
                       {"hosts": 1}, [], 10)
    data = json.loads(text)
    check_chrome_trace(data)
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in data["traceEvents"]
               if e["name"] == "thread_name"}
    assert threads[0, SLOT_TID].startswith("slot 0") and threads[1, SLOT_TID + 1].startswith(
        "slot 1")
    assert data["otherData"]["truncated"]["dropped_spans_by_rank"] == {"1": 3}
    assert np.isclose([e for e in data["traceEvents"] if e["ph"] == "X"][0]["dur"], 2.0)


def test_gpu_spans_are_event_durations_placed_by_the_reference_event():
    """On the GPU a span's duration is its CUDA events' elapsed time, and its start is the
    reference event's host time plus the elapsed time from the reference event (a stand-in
    device whose clock runs 1000 s away from the host's)."""
    from types import SimpleNamespace

    from spmd_moe.backend.array import PhaseTimer

    device_now = [1000.0]

    class Event:
        def record(self):
            self.t = device_now[0]

        def synchronize(self):
            pass

    cuda = SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3)
    bk = SimpleNamespace(on_gpu=True, xp=SimpleNamespace(cuda=cuda), synchronize=lambda: None)
    tracer = Tracer(MPI.COMM_SELF)
    tracer.align()
    timer = PhaseTimer(bk)
    tracer.arm(timer, bk)
    _, host_ref = tracer._reference
    timer.cursor.place(SpanContext(0, 0, 2, 7))
    device_now[0] += 0.25                    # the device reaches the phase 250 ms later
    with timer.phase("experts"):
        device_now[0] += 0.125
    tracer.collect(timer, bk)
    (pid, tid, name, start, end, args), = tracer.events
    assert (tid, name, args) == (SLOT_TID, "experts",
                                 {"micro_batch": 0, "slot": 0, "rows": 7, "layer": 2})
    assert start == pytest.approx(host_ref + 0.25) and end - start == pytest.approx(0.125)
    assert timer.totals() == {"experts": pytest.approx(0.125)}


def test_bytes_go_to_the_span_just_timed_even_past_the_limit():
    timer = Backend(choose_backend("numpy"), "float32").timer()
    timer.spans, timer.span_room = [], 1
    timer.cursor.place(SpanContext(0, 0, 0, 3))
    with timer.phase("dispatch"):
        pass
    timer.add_bytes("dispatch", 10)
    timer.cursor.place(SpanContext(0, 0, 1, 3))
    with timer.phase("dispatch"):              # dropped: past the room of one span
        pass
    timer.add_bytes("dispatch", 99)
    assert [s[4] for s in timer.spans] == [10] and timer.span_dropped == 1
    assert timer.bytes_sent == {"dispatch": 109}
