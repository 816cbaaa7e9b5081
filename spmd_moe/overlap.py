"""Two micro-batches in flight on a stage: one's dispatch or combine moves while the other
computes its attention or its experts (the two-micro-batch overlap of DeepSeek and SGLang).

A stage pass of one micro-batch is a *generator* (engine.Engine.pass_steps): it computes
until it has started a non-blocking exchange (dispatch, combine, a TP allreduce), yields
that exchange, and gets its result back when it is resumed. :func:`run_passes` drives the
passes of a stage's micro-batches in order:

- without overlap, each pass runs to its end before the next starts, every exchange waited
  at once (the bulk-synchronous loop of SPEC §3);
- with overlap, two passes are in flight: the driver resumes the older one (waiting for its
  exchange), runs it to its next exchange, then does the same with the other. So A's
  dispatch is in flight while B computes its attention, B's dispatch while A runs its
  experts, and so on. The newer pass never gets ahead of the older in (layer, step) order:
  a later chunk of a sequence finds its earlier chunks' keys in the KV cache of every
  layer it reaches. Every rank of a stage runs the same driver over the same number of
  micro-batches, and every pass yields at the same points whatever its data (an empty
  micro-batch too), so the stage's collectives are issued in the same order everywhere.

Both ways run the same operations on the same data: outputs are bitwise identical.

:class:`Flight` starts, tests and waits the exchanges and accounts for them. MPI moves data
only inside MPI calls unless the library runs a progress thread (MPICH:
``MPIR_CVAR_ASYNC_PROGRESS=1``), so the engine *pokes* (tests) the exchanges in flight
between its compute phases. Per exchange, in host time:

- **in flight**: from the start call's entry to the last moment the exchange was seen
  incomplete (by a poke, or by a test just before the final wait). A lower bound of how long
  it took: completion is only observed at pokes, and an exchange seen complete at its first
  poke counts as over when its start call began.
- **exposed**: the time this rank spent inside MPI calls for it (start, pokes, wait);
- **hidden** = max(0, in flight - the exposed time within it): time the exchange was
  incomplete while this rank computed instead of waiting for it. In a bulk-synchronous stage
  an exchange also waits for its slowest peer to join; that wait, too, is hidden when the
  rank computes meanwhile (the blocking loop pays it inside the collective).

On the GPU with NCCL (the exchange on a side stream) the device measures both: in flight is
the side stream's time for it, exposed the time the compute stream stalled waiting for it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator, Iterable


@dataclass
class Exchange:
    """One started exchange: its request (``Test()``/``Wait()``; transport.PendingExchange)
    and its accounting (host seconds from time.perf_counter)."""

    phase: str
    request: object
    began: float
    exposed: float
    seen_open: float = 0.0         # last moment seen incomplete (began if never)
    exposed_then: float = 0.0      # exposed time up to seen_open
    done: bool = False

    def test(self, clock) -> bool:
        """Test the request once, accounting for the call; True once complete."""
        began = clock()
        done = self.request.Test()
        now = clock()
        self.exposed += now - began
        if not done:
            self.seen_open, self.exposed_then = now, self.exposed
        self.done = bool(done)
        return self.done


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
        exchange = Exchange(phase, request, began, self.clock() - began, seen_open=began)
        self.timer.add_bytes(phase, nbytes)
        self.pending.append(exchange)
        return exchange

    def poke(self) -> None:
        """Test every exchange in flight: lets MPI progress them, and notes when each
        completed."""
        for exchange in self.pending:
            if not exchange.done:
                with self.timer.phase(exchange.phase):
                    exchange.test(self.clock)

    def wait(self, exchange: Exchange):
        """Wait for ``exchange``; returns its result (received rows, reduced array)."""
        with self.timer.phase(exchange.phase):
            if not exchange.done:
                exchange.test(self.clock)
            began = self.clock()
            result = exchange.request.Wait()
            exchange.exposed += self.clock() - began
        self.pending.remove(exchange)
        self.finished.append(exchange)
        return result

    def summary(self) -> dict[str, float]:
        """Seconds in flight, exposed and hidden, summed over the finished exchanges (device
        times where the request has them: ``device_times() -> (in_flight, stalled)``)."""
        in_flight = exposed = hidden = 0.0
        for exchange in self.finished:
            device = getattr(exchange.request, "device_times", lambda: None)()
            if device is not None:
                flying, stalled = device
                spent = within = exchange.exposed if stalled is None else stalled
            else:
                flying = exchange.seen_open - exchange.began
                spent, within = exchange.exposed, exchange.exposed_then
            in_flight += flying
            exposed += spent
            hidden += max(0.0, flying - within)
        return {"exchanges": float(len(self.finished)), "in_flight_s": in_flight,
                "exposed_s": exposed, "hidden_s": hidden}


Pass = Generator[Exchange, object, object]


def run_pass(steps: Pass, flight: Flight):
    """Run one stage pass to its end, waiting for each exchange as soon as it starts."""
    value = None
    while True:
        try:
            exchange = steps.send(value)
        except StopIteration as stop:
            return stop.value
        value = flight.wait(exchange)


def run_passes(passes: Iterable[Pass], flight: Flight, overlap: bool) -> list:
    """Run a stage's passes in order, two in flight when ``overlap``; their results, in
    order (see the module docstring)."""
    passes = list(passes)
    if not overlap or len(passes) < 2:
        return [run_pass(steps, flight) for steps in passes]
    results: list = [None] * len(passes)
    in_flight: list[tuple[int, Pass, Exchange]] = []     # oldest first
    upcoming = iter(enumerate(passes))

    def advance(index: int, steps: Pass, value) -> bool:
        """Resume a pass with ``value``; queue it at its next exchange. False once done."""
        try:
            exchange = steps.send(value)
        except StopIteration as stop:
            results[index] = stop.value
            return False
        in_flight.append((index, steps, exchange))
        return True

    def start_next() -> None:
        for index, steps in upcoming:
            if advance(index, steps, None):
                return

    start_next()
    start_next()
    while in_flight:
        index, steps, exchange = in_flight.pop(0)
        if not advance(index, steps, flight.wait(exchange)):
            start_next()
    return results
