"""The two-micro-batch driver and the exchange accounting (overlap.py), on stand-in
requests and a stand-in clock: the order in which passes run their steps, that results come
back in order, and what counts as in flight, exposed and hidden."""
import numpy as np
import pytest

from spmd_moe.backend.array import Backend, choose_backend
from spmd_moe.parallel.overlap import CHECKPOINT, Flight, run_pass, run_passes


class Request:
    """A stand-in exchange: completes after ``polls`` Test() calls (or at Wait)."""

    def __init__(self, value, polls: int = 1, clock=None, wait_cost: float = 0.0):
        self.value, self.polls, self.tests = value, polls, 0
        self.clock, self.wait_cost = clock, wait_cost

    def Test(self):
        self.tests += 1
        return self.tests >= self.polls

    def Wait(self):
        if self.clock is not None:
            self.clock.now += self.wait_cost
        return self.value


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def timer():
    return Backend(choose_backend("numpy"), "float32").timer()


def steps(name, layers, log, flight, polls=lambda: 1):
    """A stage pass: per layer an attention step, a dispatch, the experts, a combine, with
    checkpoints between compute phases; each exchange needs ``polls()`` tests."""
    for layer in range(layers):
        log.append((name, layer, "attention"))
        yield CHECKPOINT
        log.append((name, layer, "router"))
        got = yield flight.start("dispatch", lambda: Request((name, layer, "d"), polls()))
        assert got == (name, layer, "d")
        log.append((name, layer, "experts"))
        yield CHECKPOINT
        got = yield flight.start("combine", lambda: Request((name, layer, "c"), polls()))
        assert got == (name, layer, "c")
    return name


STEPS = ("attention", "router", "experts")


def test_without_overlap_passes_run_one_after_the_other():
    log, flight = [], Flight(timer())
    results = run_passes([steps(m, 2, log, flight) for m in "ABC"], flight, overlap=False)
    assert results == ["A", "B", "C"]
    assert [entry[0] for entry in log] == ["A"] * 6 + ["B"] * 6 + ["C"] * 6
    assert flight.summary()["exchanges"] == 12 and not flight.pending


@pytest.mark.parametrize("seed", range(6))
def test_with_overlap_the_older_leads_and_the_newer_fills_its_waits(seed):
    """Exchanges complete after a random number of tests: whatever the timing, results come
    back in order, at most two passes are between their first and last step, the newer
    never reaches a (layer, step) before the older, and the newer does run while the older
    waits."""
    rng = np.random.default_rng(seed)
    log, flight = [], Flight(timer())
    passes = [steps(m, 3, log, flight, polls=lambda: int(rng.integers(1, 5))) for m in "ABCDE"]
    assert run_passes(passes, flight, overlap=True) == list("ABCDE")
    order = {entry: i for i, entry in enumerate(log)}
    assert len(order) == len(log) == 5 * 3 * 3
    for older, newer in zip("ABCD", "BCDE"):
        for layer in range(3):
            for step in STEPS:
                assert order[(older, layer, step)] < order[(newer, layer, step)]
    first = {m: order[(m, 0, "attention")] for m in "ABCDE"}
    last = {m: order[(m, 2, "experts")] for m in "ABCDE"}
    for i in range(len(log)):
        assert sum(first[m] <= i <= last[m] for m in "ABCDE") <= 2
    assert first["C"] > last["A"]                     # C starts once A is done
    # Interleaved: B computed something between A's first and last step.
    assert any(first["A"] < order[("B", layer, step)] < last["A"]
               for layer in range(3) for step in STEPS)


def test_a_pass_without_exchanges_and_one_pass_alone():
    def plain(value):
        return value
        yield  # a generator that never yields

    flight = Flight(timer())
    assert run_passes([plain(1), plain(2), plain(3)], flight, overlap=True) == [1, 2, 3]
    log = []
    assert run_pass(steps("A", 1, log, flight), flight) == "A"


def test_accounting_in_flight_exposed_and_hidden():
    clock = Clock()
    flight = Flight(timer(), clock=clock)
    request = Request("rows", polls=3, clock=clock, wait_cost=0.5)
    exchange = flight.start("dispatch", lambda: request, nbytes=64)
    clock.now = 2.0                  # the other micro-batch computes for 2 s
    flight.poke()                    # test 1: still open at t=2
    clock.now = 5.0
    assert flight.wait(exchange) == "rows"   # test 2 open at t=5, then Wait costs 0.5 s
    summary = flight.summary()
    # In flight at least until t=5 (last seen open); exposed: the 0.5 s wait; hidden 5 s.
    assert summary == pytest.approx({"exchanges": 1.0, "in_flight_s": 5.0,
                                     "exposed_s": 0.5, "hidden_s": 5.0})
    assert flight.timer.bytes_sent["dispatch"] == 64


def test_an_exchange_seen_complete_at_once_hides_nothing():
    clock = Clock()
    flight = Flight(timer(), clock=clock)
    exchange = flight.start("combine", lambda: Request("x", polls=1))
    clock.now = 3.0
    flight.poke()                    # complete at its first test: maybe long before t=3
    flight.wait(exchange)
    assert flight.summary()["hidden_s"] == 0.0 and flight.summary()["in_flight_s"] == 0.0


def test_device_times_take_precedence():
    class Device(Request):
        def device_times(self):
            return 4.0, 1.5

    flight = Flight(timer(), clock=Clock())
    flight.wait(flight.start("dispatch", lambda: Device("x")))
    assert flight.summary() == pytest.approx({"exchanges": 1.0, "in_flight_s": 4.0,
                                              "exposed_s": 1.5, "hidden_s": 2.5})


def test_two_exchanges_in_flight_at_once_count_once():
    clock = Clock()
    flight = Flight(timer(), clock=clock)
    first = flight.start("dispatch", lambda: Request("a", polls=3))
    clock.now = 1.0
    second = flight.start("combine", lambda: Request("b", polls=3))
    clock.now = 4.0
    flight.poke()                                # both open at t=4
    clock.now = 6.0
    flight.wait(first)                           # open at 6, then complete
    flight.wait(second)
    summary = flight.summary()
    # Union of [0, 6] and [1, 6]: 6 s in flight, all of it computing (the tests are
    # instantaneous on this clock), not 11.
    assert summary == pytest.approx({"exchanges": 2.0, "in_flight_s": 6.0, "exposed_s": 0.0,
                                     "hidden_s": 6.0})
    assert summary["hidden_s"] <= clock.now


def test_the_bookkeeping_is_linear_in_the_exchanges(monkeypatch):
    """Issue #22: summary tested ``exchange in host`` with the dataclass's field-wise
    ``__eq__`` (29.5 M calls, 20 s outside the timed window, for 4-token chunks at batch
    64). Counted, not timed: comparisons stay within a few per exchange."""
    from spmd_moe.parallel import overlap

    class Device(Request):
        def device_times(self):
            return 1.0, 0.5

    calls = []
    monkeypatch.setattr(overlap.Exchange, "__eq__",
                        lambda self, other: calls.append(1) or self is other)
    flight, log = Flight(timer(), clock=Clock()), []
    run_passes([steps(f"p{m}", 4, log, flight, polls=lambda: 2) for m in range(60)], flight,
               overlap=True)
    for _ in range(300):
        flight.wait(flight.start("dispatch", lambda: Device("x")))
    exchanges = len(flight.finished)
    assert exchanges == 60 * 4 * 2 + 300
    calls.clear()
    summary = flight.summary()
    assert summary["exchanges"] == exchanges and not calls
    flight.finished.clear()
    run_passes([steps(f"q{m}", 4, log, flight, polls=lambda: 2) for m in range(60)], flight,
               overlap=True)
    assert len(calls) <= 4 * len(flight.finished)
