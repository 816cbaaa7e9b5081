"""Stage passes in flight: the driver of the two-micro-batch overlap, and the accounting
of every exchange (docs/ARCHITECTURE.md, "Overlap", has the why and the measurements).

- A stage pass (engine.Engine.pass_steps) is a generator: it yields each non-blocking
  exchange it has started (:meth:`Flight.start` returns an :class:`Exchange`) and gets the
  exchange's result back when resumed; between compute phases it yields
  :data:`CHECKPOINT`, where it may be paused.
- :func:`run_passes` runs a stage's passes in order: one at a time (every exchange waited
  at once: SPEC §3's bulk-synchronous loop), or two in flight, the older first, the newer
  computing while the older waits, never getting ahead of it (so chunks find their earlier
  chunks' keys, and passes finish in order). Both run the same operations on the same
  data: outputs are bitwise identical. Pass m's collectives go on slot m % 2's
  communicator (the engine's Dup of the stage communicator).
- :class:`Flight` starts, pokes (MPI progresses only inside MPI calls), waits and accounts
  for the exchanges: per rank and forward, **in flight**, **exposed** (inside MPI calls)
  and **hidden** (in flight while computing), unions over the exchanges; a request with
  ``device_times()`` (NCCL on its side stream) reports the device's own.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable

from ..core.phases import FROM_STAGE_PHASES


@dataclass(eq=False)
class Exchange:
    """One started exchange: its request (``Test()``/``Wait()``; transport.PendingExchange)
    and its accounting (host seconds from the Flight's clock). Compared by identity: a
    field-wise ``__eq__`` made every ``in`` and ``remove`` over a forward's exchanges
    compare their call lists (29.5 M calls for 4-token chunks at batch 64)."""

    phase: str
    request: object
    began: float
    seen_open: float               # last moment seen incomplete (began if never)
    calls: list = field(default_factory=list)   # (start, end) of each MPI call for it
    done: bool = False
    context: object = None         # the timer's context when started (its pass: trace.py)

    @property
    def exposed(self) -> float:
        return sum(end - start for start, end in self.calls)

    def call(self, clock, fn):
        """``fn()``, timed as one of this exchange's MPI calls."""
        start = clock()
        try:
            return fn()
        finally:
            self.calls.append((start, clock()))

    def test(self, clock) -> bool:
        """Test the request once, accounting for the call; True once complete."""
        self.done = bool(self.call(clock, self.request.Test))
        if not self.done:
            self.seen_open = self.calls[-1][1]
        return self.done


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted union of ``(start, end)`` intervals."""
    out: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two disjoint sorted interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


class Flight:
    """The exchanges a rank has in flight, with their accounting. ``timer`` (a
    backend.PhaseTimer) gets the exposed time under each exchange's phase."""

    def __init__(self, timer, clock: Callable[[], float] = time.perf_counter):
        self.timer, self.clock = timer, clock
        self.pending: list[Exchange] = []
        self.finished: list[Exchange] = []

    def start(self, phase: str, starter: Callable[[], object], nbytes: int = 0) -> Exchange:
        """Start an exchange (``starter()`` returns its request)."""
        began = self.clock()
        with self.timer.phase(phase):
            request = starter()
        exchange = Exchange(phase, request, began, began, [(began, self.clock())],
                            context=self.timer.cursor.context)
        self.timer.add_bytes(phase, nbytes)
        self.pending.append(exchange)
        return exchange

    def poke(self, exchange: Exchange | None = None) -> None:
        """Test ``exchange`` (default: every exchange in flight): lets MPI progress it, and
        notes when it completed."""
        for item in (self.pending if exchange is None else [exchange]):
            if not item.done:
                with self.timer.phase(item.phase, item.context):
                    item.test(self.clock)

    def wait_first(self, exchanges: list[Exchange]) -> Exchange:
        """Test ``exchanges`` in turn until one has completed; return it. The whole wait is
        exposed time of each of them (timed under the first's phase). MPI's own waits spin
        the same way; this one yields the core between rounds (ranks may share cores)."""
        began = self.clock()
        with self.timer.phase(exchanges[0].phase, exchanges[0].context):
            while True:
                first = next((e for e in exchanges if e.done or e.request.Test()), None)
                if first is not None:
                    break
                os.sched_yield()
        span = (began, self.clock())
        for exchange in exchanges:
            exchange.calls.append(span)
            if exchange is not first:
                exchange.seen_open = span[1]
        first.done = True
        return first

    def wait(self, exchange: Exchange):
        """Wait for ``exchange``; returns its result (received rows, reduced array)."""
        with self.timer.phase(exchange.phase, exchange.context):
            if not exchange.done:
                exchange.test(self.clock)
            result = exchange.call(self.clock, exchange.request.Wait)
        self.pending.remove(exchange)
        self.finished.append(exchange)
        return result

    def summary(self) -> dict[str, float]:
        """Seconds the stage's exchanges were in flight, exposed and hidden (module
        docstring), over the finished ones: receives from another stage are pipeline waits,
        not communication to hide, and are left out. Host times are unions over the
        exchanges (two in flight at once count once); where a request has device times
        (``device_times() -> (in_flight, stalled)``: NCCL on its side stream) they are
        summed instead."""
        exchanges = [e for e in self.finished if e.phase not in FROM_STAGE_PHASES]
        host, device = [], []
        for e in exchanges:      # one pass: linear in the forward's exchanges
            (host if getattr(e.request, "device_times", None) is None else device).append(e)
        flying = _union([(e.began, e.seen_open) for e in host])
        calls = _union([c for e in host for c in e.calls])
        in_flight, exposed = _length(flying), _length(calls)
        hidden = in_flight - _overlap(flying, calls)
        for exchange in device:
            device_flying, stalled = exchange.request.device_times()
            spent = exchange.exposed if stalled is None else stalled
            in_flight += device_flying
            exposed += spent
            hidden += max(0.0, device_flying - spent)
        return {"exchanges": float(len(exchanges)), "in_flight_s": in_flight,
                "exposed_s": exposed, "hidden_s": hidden}


Pass = Generator[object, object, object]


class _Checkpoint:
    """Yielded by a pass between compute phases: the driver may pause it there."""

    def __repr__(self) -> str:
        return "CHECKPOINT"


CHECKPOINT = _Checkpoint()


def run_pass(steps: Pass, flight: Flight):
    """Run one stage pass to its end, waiting for each exchange as soon as it starts."""
    value = None
    while True:
        try:
            item = steps.send(value)
        except StopIteration as stop:
            return stop.value
        value = None if item is CHECKPOINT else flight.wait(item)


class _InFlight:
    """A pass between two of its steps: what it yielded last (an exchange, or a
    checkpoint), and its micro-batch's index."""

    def __init__(self, index: int, steps: Pass):
        self.index, self.steps, self.item = index, steps, None
        self.exchanges = 0        # exchanges yielded so far (every pass yields the same)
        self.context = None       # where the pass is while it runs (trace.PassCursor)

    def ready(self, flight: Flight) -> bool:
        """Can run now without blocking: at a checkpoint, or its exchange is complete."""
        if self.item is CHECKPOINT:
            return True
        flight.poke(self.item)
        return self.item.done


def run_passes(passes: Iterable[Pass], flight: Flight, overlap: bool) -> list:
    """Run a stage's passes in order, two in flight (the older first) when ``overlap``;
    their results, in order (see the module docstring)."""
    passes = list(passes)
    if not overlap or len(passes) < 2:
        return [run_pass(steps, flight) for steps in passes]
    results: list = [None] * len(passes)
    upcoming = iter(enumerate(passes))
    in_flight: list[_InFlight] = []          # oldest first, at most two

    def resume(entry: _InFlight) -> None:
        """Run ``entry`` to its next yield (an exchange it waits for is waited first)."""
        value = None
        if entry.item is not None and entry.item is not CHECKPOINT:
            value = flight.wait(entry.item)
        # The cursor is the running pass's: place what the pass last left, keep what it
        # leaves (a pass places its own when it starts and at each layer).
        flight.timer.cursor.place(entry.context)
        try:
            entry.item = entry.steps.send(value)
        except StopIteration as stop:
            results[entry.index] = stop.value
            in_flight.remove(entry)
            return
        finally:
            entry.context = flight.timer.cursor.context
        if entry.item is not CHECKPOINT:
            entry.exchanges += 1

    def fill() -> None:
        while len(in_flight) < 2:
            nxt = next(upcoming, None)
            if nxt is None:
                return
            entry = _InFlight(*nxt)
            in_flight.append(entry)
            resume(entry)

    fill()
    while in_flight:
        if any(entry.item is CHECKPOINT for entry in in_flight):
            flight.poke()                    # between compute phases: let MPI progress
        older = in_flight[0]
        newer = in_flight[1] if len(in_flight) > 1 else None
        if newer is None or older.ready(flight):
            resume(older)
        elif newer.exchanges >= older.exchanges:
            resume(older)                    # the newer may not pass: wait for the older
        elif newer.ready(flight):
            # The newer computes until its next checkpoint or exchange, which is at most the
            # one the older waits at: it never gets ahead of the older.
            resume(newer)
        else:
            # Both wait: go on with whichever exchange completes first.
            first = flight.wait_first([older.item, newer.item])
            resume(older if first is older.item else newer)
        fill()
    return results
