"""The two-micro-batch driver and the exchange accounting (overlap.py), on stand-in
requests and a stand-in clock: the order in which passes run their steps, that results come
back in order, and what counts as in flight, exposed and hidden."""
import pytest

from spmd_moe.backend import Backend, choose_backend
from spmd_moe.overlap import Flight, run_pass, run_passes


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


def steps(name, layers, log, flight):
    """A stage pass: per layer a compute step, then a dispatch and a combine exchange."""
    for layer in range(layers):
        log.append((name, layer, "attention"))
        got = yield flight.start("dispatch", lambda: Request((name, layer, "d")))
        assert got == (name, layer, "d")
        log.append((name, layer, "experts"))
        got = yield flight.start("combine", lambda: Request((name, layer, "c")))
        assert got == (name, layer, "c")
    return name


def test_without_overlap_passes_run_one_after_the_other():
    log, flight = [], Flight(timer())
    results = run_passes([steps(m, 2, log, flight) for m in "ABC"], flight, overlap=False)
    assert results == ["A", "B", "C"]
    assert [entry[0] for entry in log] == ["A"] * 4 + ["B"] * 4 + ["C"] * 4
    assert flight.summary()["exchanges"] == 12 and not flight.pending


def test_with_overlap_two_passes_alternate_and_the_newer_never_leads():
    log, flight = [], Flight(timer())
    results = run_passes([steps(m, 2, log, flight) for m in "ABCD"], flight, overlap=True)
    assert results == ["A", "B", "C", "D"]
    assert log[:6] == [("A", 0, "attention"), ("B", 0, "attention"), ("A", 0, "experts"),
                       ("B", 0, "experts"), ("A", 1, "attention"), ("B", 1, "attention")]
    # C starts only when A is done, and reaches each (layer, step) after B did.
    assert log.index(("C", 0, "attention")) > log.index(("A", 1, "experts"))
    order = {entry: i for i, entry in enumerate(log)}
    for older, newer in ("AB", "BC", "CD"):
        for layer in range(2):
            for step in ("attention", "experts"):
                assert order[(older, layer, step)] < order[(newer, layer, step)]
    # Never more than two passes between their first and last step.
    for i in range(len(log)):
        started = {e[0] for e in log[:i + 1]}
        finished = {m for m in started if order[(m, 1, "experts")] < i}
        assert len(started - finished) <= 2


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
