"""``--trace FILE.json``: a Chrome trace-event timeline of every rank (Perfetto,
chrome://tracing; docs/PERFORMANCE.md, "Reading a trace", shows how to read one and what
it costs).

- **Spans are the phases the report times**: backend.PhaseTimer, given a span list, keeps
  each phase's (start, stop) (host clock on NumPy, its CUDA events on the GPU, placed on
  the host timeline by a reference event), with the :class:`SpanContext` of the stage pass
  it belongs to and the bytes it sent. Consecutive spans of one phase in one context merge.
- **Where a pass is** is the timer's :class:`PassCursor`: the engine places it when a pass
  starts and at each layer, overlap.run_passes swaps it between the two passes in flight,
  an exchange keeps the context it was started in; the watchdog listens to it too.
- **Rows** of a rank (``pid`` = rank): ``tid`` 0 the host's iterations, barriers and device
  syncs, 1 the stage's phases outside a micro-batch, 2 and 3 the two overlap slots (micro-
  batch m in slot m % 2). Categories (``cat``) from core/phases.py: ``compute``, ``comm``,
  ``idle``, and ``host``.
- **Clocks**: time zero is each rank's exit from a set-up barrier; the spread of that exit
  (ranks on one host) is measured and written in the metadata.
- **Bounded memory**: at most ``limit`` spans per rank (:data:`MAX_SPANS_PER_RANK`);
  :meth:`Tracer.plan` says beforehand which iterations fit, spans beyond the limit are
  dropped and counted (``truncated``).

The trace is gathered to rank 0 (``gather``: collective) and written with the run's other
outputs (files.write_files: all or none, atomically).
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, NamedTuple

from .phases import category

# A rank keeps at most this many spans: ~200 bytes each in memory and in the file, so 20 MB
# per rank (a 16-rank trace of 300 MB is still one Perfetto opens).
MAX_SPANS_PER_RANK = 100_000
# Spans one micro-batch makes per layer, as planned (the phases, the pokes of its exchanges
# between the other micro-batch's phases with overlap, the split attention and permute).
# The pokes depend on timing (11-25 per layer seen in a 4-rank run, 18 on average), so this
# sizes an iteration, not each layer; the hard limit is what bounds memory.
SPANS_PER_LAYER = 24

ITERATIONS_TID, STAGE_TID, SLOT_TID = 0, 1, 2          # slot s is tid SLOT_TID + s
THREAD_NAMES = {ITERATIONS_TID: "iterations (host)", STAGE_TID: "stage (between micro-batches)",
                SLOT_TID: "slot 0 (even micro-batches)", SLOT_TID + 1: "slot 1 (odd micro-batches)"}


class SpanContext(NamedTuple):
    """Which stage pass a span belongs to: its micro-batch (index in the iteration), slot
    (micro_batch % 2: its communicator and its row in the trace), layer (-1 outside the
    layer loop), and rows (the micro-batch's tokens on this rank)."""

    micro_batch: int
    slot: int
    layer: int = -1
    rows: int = 0


class PassCursor:
    """Where this rank's running stage pass is: its :class:`SpanContext`, None outside a
    pass. The one owner of that position: the engine moves it (:meth:`start_pass`,
    :meth:`at_layer`, :meth:`leave_layers`, :meth:`end`), overlap.run_passes swaps it between
    the two passes in flight (:meth:`place`), the PhaseTimer stamps each span with it, and
    listeners (the runner's watchdog) are told the layer whenever it is placed."""

    def __init__(self) -> None:
        self.context: SpanContext | None = None
        self._listeners: list[Callable[[int], None]] = []

    def listen(self, on_layer: Callable[[int], None]) -> None:
        """``on_layer(layer)`` is called each time the cursor is placed in a pass."""
        self._listeners.append(on_layer)

    def place(self, context: SpanContext | None) -> None:
        self.context = context
        if context is not None:
            for on_layer in self._listeners:
                on_layer(context.layer)

    def start_pass(self, micro_batch: int, rows: int) -> None:
        """Micro-batch ``micro_batch`` (slot micro_batch % 2) starts, outside any layer."""
        self.place(SpanContext(micro_batch, micro_batch % 2, -1, rows))

    def at_layer(self, layer: int) -> None:
        self.place((self.context or SpanContext(-1, -1))._replace(layer=layer))

    def leave_layers(self) -> None:
        if self.context is not None:
            self.place(self.context._replace(layer=-1))

    def end(self) -> None:
        self.place(None)



class Tracer:
    """One rank's trace. Build it on every rank and :meth:`align` (collective) before the
    first timed iteration; :meth:`gather` (collective) returns the Chrome JSON on rank 0.

    ``processes``: ``[(pid offset, label)]`` of the deployments this rank runs (compare runs
    two: each gets its own processes, ``pid = offset + rank``); :meth:`deployment` switches.
    """

    def __init__(self, world, limit: int = MAX_SPANS_PER_RANK):
        self.world = world
        self.rank = world.Get_rank()
        self.size = world.Get_size()
        self.limit = limit
        self.events: list[tuple] = []      # (pid, tid, name, start_s, end_s, args|None)
        self.processes: dict[int, str] = {}
        self.pid = self.rank
        self.dropped = 0
        self.t0 = 0.0
        self.skew: dict = {}
        self.notes: list[str] = []
        self._reference = None             # (cuda event, host seconds) of this iteration

    # --- set-up --------------------------------------------------------------------------

    def align(self) -> None:
        """Collective: time zero is this rank's exit from a barrier (the last of three); the
        spread of the exits between ranks on one host is measured."""
        from mpi4py import MPI

        exits = []
        for _ in range(3):
            self.world.Barrier()
            exits.append(time.perf_counter())
        self.t0 = exits[-1]
        rows = self.world.gather((MPI.Get_processor_name(), exits), root=0)
        if self.rank == 0:
            spreads: list[float] = []
            hosts = {host for host, _ in rows}
            for host in hosts:
                same = [times for name, times in rows if name == host]
                if len(same) > 1:
                    for i in range(3):
                        column = [times[i] for times in same]
                        spreads.append((max(column) - min(column)) * 1e6)
            self.skew = {"method": "barrier exit, time.perf_counter (CLOCK_MONOTONIC)",
                         "hosts": len(hosts)}
            if spreads:
                self.skew["barrier_exit_spread_us"] = {
                    "median": statistics.median(spreads), "max": max(spreads)}
            if len(hosts) > 1:
                self.skew["across_hosts"] = "not measured (about one barrier's latency)"

    def deployment(self, label: str, offset: int = 0) -> None:
        """Name this rank's process (``pid = offset + rank``) and record into it."""
        self.pid = offset + self.rank
        self.processes[self.pid] = label

    def plan(self, per_iteration: int, iterations: int, what: str = "iteration") -> str | None:
        """The spans ``iterations`` of ``per_iteration`` will make, against the limit; a
        line saying which iterations fit when they do not all fit (else None)."""
        room = self.limit - len(self.events)
        total = per_iteration * iterations
        if total <= room:
            return None
        fit = max(0, room // max(1, per_iteration))
        line = (f"--trace: the schedule makes about {per_iteration:,} spans per {what} on a "
                f"rank, {total:,} for {iterations}; the trace keeps {self.limit:,} per rank "
                f"(about the first {fit} {what}s) and notes what it dropped")
        self.notes.append(line)
        return line

    # --- recording -----------------------------------------------------------------------

    def now(self) -> float:
        return time.perf_counter()

    def host_span(self, name: str, start: float, end: float, tid: int = ITERATIONS_TID,
                  args: dict | None = None) -> None:
        """A span timed on the host (seconds of time.perf_counter)."""
        if len(self.events) >= self.limit:
            self.dropped += 1
            return
        self.events.append((self.pid, tid, name, start, end, args))

    def arm(self, timer, bk) -> None:
        """Give ``timer`` (a backend.PhaseTimer) a span list and the room left, and on the
        GPU record the reference event (the device is idle: the iteration starts after a
        synchronisation and a barrier)."""
        timer.spans = []
        timer.span_room = max(0, self.limit - len(self.events))
        self._reference = None
        if bk.on_gpu:
            bk.synchronize()
            event = bk.xp.cuda.Event()
            event.record()
            self._reference = (event, time.perf_counter())

    def collect(self, timer, bk) -> None:
        """Move ``timer``'s spans (after the iteration's device sync) into the trace."""
        spans, timer.spans = timer.spans or [], None
        self.dropped += timer.span_dropped
        reference = self._reference
        for name, start, stop, context, sent in spans:
            if len(self.events) >= self.limit:
                self.dropped += 1
                continue
            if reference is not None:
                elapsed = bk.xp.cuda.get_elapsed_time
                event, host = reference
                start_s = host + elapsed(event, start) / 1e3
                end_s = host + elapsed(event, stop) / 1e3
            else:
                start_s, end_s = start, stop
            if context is None:
                tid, args = STAGE_TID, {}
            else:
                tid = SLOT_TID + max(0, context.slot)
                args = {"micro_batch": context.micro_batch, "slot": context.slot,
                        "rows": context.rows}
                if context.layer >= 0:
                    args["layer"] = context.layer
            if sent:
                args["bytes"] = sent
            self.events.append((self.pid, tid, name, start_s, end_s, args or None))

    # --- output --------------------------------------------------------------------------

    def gather(self) -> str | None:
        """Collective: every rank's events to rank 0; the trace's JSON text there (None
        elsewhere)."""
        t0 = self.t0
        mine = [(pid, tid, name, round((start - t0) * 1e6, 3),
                 round(max(0.0, end - start) * 1e6, 3), args)
                for pid, tid, name, start, end, args in self.events]
        gathered = self.world.gather({"events": mine, "processes": self.processes,
                                      "dropped": self.dropped}, root=0)
        if self.rank != 0:
            return None
        return chrome_json(gathered, self.skew, self.notes, self.limit)


def chrome_json(per_rank: list[dict], skew: dict, notes: list[str], limit: int) -> str:
    """The Chrome trace-event JSON (object form) of every rank's events."""
    events: list[dict] = []
    processes: dict[int, str] = {}
    for part in per_rank:
        processes.update(part["processes"])
    for pid, label in sorted(processes.items()):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "ts": 0,
                       "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "ts": 0, "args": {"sort_index": pid}})
        for tid, name in THREAD_NAMES.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "ts": 0,
                           "args": {"name": name}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                           "ts": 0, "args": {"sort_index": tid}})
    for part in per_rank:
        for pid, tid, name, ts, dur, args in part["events"]:
            event = {"ph": "X", "name": name, "cat": "host" if tid == ITERATIONS_TID and
                     category(name) != "idle" else category(name), "pid": pid, "tid": tid,
                     "ts": ts, "dur": dur}
            if args:
                event["args"] = args
            events.append(event)
    dropped = {str(rank): part["dropped"] for rank, part in enumerate(per_rank)
               if part["dropped"]}
    meta = {"generator": "spmd-moe --trace", "clock": skew, "span_limit_per_rank": limit,
            "time_unit": "microseconds from the set-up barrier"}
    if dropped or notes:
        meta["truncated"] = {"dropped_spans_by_rank": dropped, "notes": notes}
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                       "otherData": meta}, separators=(",", ":")) + "\n"


def rank_label(kind: str, rank: int, stage: int, group_rank: int, prefix: str = "") -> str:
    """``rank 5: stage 1, expert-rank 1`` (the process name in the trace)."""
    return f"{prefix}rank {rank}: stage {stage}, {kind}-rank {group_rank}"
