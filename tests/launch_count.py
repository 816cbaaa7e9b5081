"""A launch counter for the engine on the fake device: what the GPU path costs in device calls
and host waits, counted, so that the performance model's GPU op table (``compute.GPU_OPS``)
and its host waits (``compute.GPU_WAITS``) are checked against the engine rather than
guessed (tests/test_launch_count.py).

The engine runs on the asynchronous fake device (fakes/device.py) as the CuPy backend with
the fused kernels' launch code; every operation queued there is one call into the device
(a kernel launch, a cuBLAS GEMM, a host<->device copy, a generic array operation, an NCCL
call; views and ``empty`` are free, as on CuPy: fakes/cupy.py), attributed to the engine
phase (PhaseTimer.phase) and layer it was queued in; every time the host waits for the
device is counted by kind: ``stream`` (a stream synchronised, as ``.get()`` does),
``device``, ``event`` (one event's work waited for), ``read`` (a device scalar read).
"""
from __future__ import annotations

import contextlib
from collections import Counter, defaultdict

from fakes.device import FakeDevice
from fakes.engine import FakeGpuBackend, fake_gpu_sessions

from spmd_moe.backend.array import PhaseTimer


class LaunchCounter:
    """Ops and host waits per (pass, layer, phase). ``pass_index`` counts a stage's passes (a
    micro-batch or a decode step through the stage); ``layer`` is the engine's current
    layer. A listener of the fake device."""

    def __init__(self):
        self.counts: dict[tuple, Counter] = defaultdict(Counter)
        self.waits: dict[tuple, Counter] = defaultdict(Counter)
        self.phase: str | None = None
        self.layer: int | None = None
        self.pass_index = -1

    def key(self) -> tuple:
        return (self.pass_index, self.layer, self.phase)

    def launched(self, kind: str, name: str) -> None:
        self.counts[self.key()][name] += 1

    def waited(self, kind: str) -> None:
        self.waits[self.key()][kind] += 1

    def ops(self, pass_index: int, layer: int) -> dict[str, int]:
        """Ops per phase of one layer of one pass."""
        return {phase: sum(c.values()) for (p, at, phase), c in self.counts.items()
                if p == pass_index and at == layer and phase is not None}

    def detail(self, pass_index: int, layer: int, phase: str) -> Counter:
        return self.counts[(pass_index, layer, phase)]

    def layer_waits(self, pass_index: int, layer: int) -> Counter:
        """Host waits of one layer of one pass, by kind, over its phases."""
        total = Counter()
        for (p, at, _), waits in self.waits.items():
            if p == pass_index and at == layer:
                total.update(waits)
        return total


class CountingTimer(PhaseTimer):
    """Tells the counter which phase the engine is in."""

    counter: LaunchCounter | None = None

    @contextlib.contextmanager
    def phase(self, name: str, context=None):
        counter = self.counter
        outer = counter.phase
        counter.phase = name
        try:
            with super().phase(name, context):
                yield
        finally:
            counter.phase = outer


class CountingBackend(FakeGpuBackend):
    def timer(self) -> PhaseTimer:
        return CountingTimer(self)


@contextlib.contextmanager
def counting(monkeypatch, transport: str = "mpi-host", seed: int = 0):
    """Within: engine.runner opens sessions on a fresh fake device (with ``transport``),
    every device call and host wait counted; yields the counter. A pass is marked where
    the engine starts one (PassCursor.start_pass: before its positions are uploaded), a
    layer at Engine._at_layer until the pass leaves its layers (one rank: passes do not
    overlap)."""
    from spmd_moe.core.trace import PassCursor
    from spmd_moe.engine import engine, runner

    counter = LaunchCounter()
    at_layer, start_pass = engine.Engine._at_layer, PassCursor.start_pass
    leave_layers = PassCursor.leave_layers

    def marked(self, layer, timer):
        counter.layer = layer
        return at_layer(self, layer, timer)

    def started(self, *args, **kwargs):
        counter.pass_index += 1
        counter.layer = None
        return start_pass(self, *args, **kwargs)

    def left(self):
        counter.layer = None
        return leave_layers(self)

    with FakeDevice(seed=seed) as device, fake_gpu_sessions(monkeypatch, transport):
        device.listeners.append(counter)
        monkeypatch.setattr(CountingTimer, "counter", counter)
        with monkeypatch.context() as patch:
            patch.setattr(runner, "Backend", lambda choice, dtype: CountingBackend(choice,
                                                                                   dtype))
            patch.setattr(engine.Engine, "_at_layer", marked)
            patch.setattr(PassCursor, "start_pass", started)
            patch.setattr(PassCursor, "leave_layers", left)
            yield counter
        device.synchronize()


__all__ = ["CountingBackend", "LaunchCounter", "counting"]
