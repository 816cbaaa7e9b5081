"""The Python API: open a session on a communicator, run prefill or decode, get outputs.

The CLI is a thin layer over these; tests call them directly. Every set-up step that can
reject user input is *collective* (errors.collective): a rank that finds a problem makes
every rank raise the same error, so no rank walks on into a collective the others never
reach. Failures after set-up are bugs or faults; the CLI aborts the job on them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from ..backend.array import Backend, BackendChoice, PhaseTimer, available_memory
from ..backend.host import peak_resident_bytes, resident_bytes
from ..core.chunks import Schedule
from ..core.config import Layout, RunConfig
from ..core.costs import GIB, rank_cost
from ..core.errors import LayoutError, collective, say
from ..core.phases import WAIT_PHASES
from ..core.progress import SILENT, Reporter
from ..core.topology import Grid, Topology
from ..core.trace import SPANS_PER_LAYER, Tracer, rank_label
from ..model.checkpoint import LoadStats, describe, load_weights, open_checkpoint
from ..model.inputs import Batch
from ..model.weights import build_weights
from ..parallel.connect import choose_backend_and_transport, make_transport
from ..parallel.overlap import Flight
from ..parallel.transport import MpiLibrary, TransportChoice
from ..parallel.watchdog import Watchdog
from .engine import Engine, injected_fault
from .outputs import gather_prefill, gather_tokens
from .session import Session


def check_memory(config: RunConfig, grid: Grid, lengths: np.ndarray, backend: str,
                 new_tokens: int, limit: int, limit_source: str) -> None:
    """Refuse, before allocating, a rank whose weights + activations + KV cache exceed
    ``limit`` bytes; the message gives the numbers."""
    cost = rank_cost(config, grid, lengths, backend, new_tokens)
    if cost.memory_bytes > limit:
        raise LayoutError("layout", (
            f"rank {grid.rank} needs {cost.memory_bytes / GIB:.2f} GiB (weights "
            f"{cost.weight_bytes / GIB:.2f}, activations {cost.activation_bytes / GIB:.2f}, "
            f"KV cache {cost.kv_bytes / GIB:.2f}) but has {limit / GIB:.2f} GiB "
            f"({limit_source}); use more ranks or stages (spmd-moe plan shows the fit)"))


def measure_peak(bk: Backend) -> tuple[float, str]:
    """The matmul rate this rank's device reaches now (FLOP/s), the MFU denominator."""
    xp = bk.xp
    if bk.on_gpu:
        n, reps = 8192, 10
        a = xp.random.standard_normal((n, n), dtype=np.float32).astype(bk.dtype)
        b = xp.random.standard_normal((n, n), dtype=np.float32).astype(bk.dtype)
        xp.matmul(a, b)
        start, stop = xp.cuda.Event(), xp.cuda.Event()
        start.record()
        for _ in range(reps):
            xp.matmul(a, b)
        stop.record()
        stop.synchronize()
        seconds = xp.cuda.get_elapsed_time(start, stop) / 1e3
        return 2.0 * n ** 3 * reps / seconds, f"measured {bk.dtype_name} {n}^3 GEMM"
    n, reps = 512, 4
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2.0 * n ** 3 * reps / (time.perf_counter() - start), f"measured float32 {n}^3 GEMM"


@dataclass
class SessionPlan:
    """A run checked and placed, nothing big allocated yet: the layout's topology, the
    backend and transport chosen, the memory check passed."""

    config: RunConfig
    topo: Topology
    backend: Backend
    backend_choice: BackendChoice
    library: MpiLibrary
    transport_choice: TransportChoice
    watchdog: Watchdog
    checkpoint: object | None = None      # checkpoint.Checkpoint: headers read and checked

    def close(self) -> None:
        self.topo.free()


def plan_session(config: RunConfig, comm, lengths: np.ndarray, layout: str | None = None,
                 backend: str = "auto", transport: str = "auto", new_tokens: int = 0,
                 memory_limit: int | None = None,
                 watchdog: Watchdog | None = None) -> SessionPlan:
    """Every check of a run that can be made before allocating: layout, backend, transport,
    ``SPMD_MOE_FAULT``, and the memory of weights, activations and KV cache for a batch
    whose sequences have ``lengths`` real tokens. Collective on ``comm``; an error is raised
    on every rank.

    ``layout`` overrides the config's (``"ep=4,pp=2"``); ``memory_limit`` (bytes) overrides
    the device's free memory in the pre-allocation check; ``watchdog`` (the CLI's) is told
    where this rank is (none: nothing is watched).
    """
    watchdog = watchdog or Watchdog(None, 0)
    with watchdog.waiting("set-up"):
        return _plan_session(config, comm, lengths, layout, backend, transport, new_tokens,
                             memory_limit, watchdog)


def _plan_session(config, comm, lengths, layout, backend, transport, new_tokens,
                  memory_limit, watchdog) -> SessionPlan:
    size = comm.Get_size()
    parsed = collective(comm, lambda: Layout.parse(layout or config.layout, size).validate(
        config.model, size))
    collective(comm, injected_fault, size, config.model.n_layers)
    topo = Topology(comm, parsed, config.model)
    try:
        # A checkpoint's headers are read and checked on every rank before anything is
        # allocated: a missing tensor or shard stops every rank here with the same error.
        checkpoint = (collective(comm, open_checkpoint, config.checkpoint, config.model)
                      if config.checkpoint else None)
        choice, library, transport_choice = choose_backend_and_transport(
            comm, backend, transport, topo.node_rank, topo.node_size)
        bk = Backend(choice, config.model.dtype)

        def memory_check() -> None:
            limit, source = ((memory_limit, "--memory-limit") if memory_limit is not None
                             else available_memory(choice, topo.node_size))
            check_memory(config, topo, lengths, bk.name, new_tokens, limit, source)

        collective(comm, memory_check)
    except BaseException:
        topo.free()
        raise
    return SessionPlan(config, topo, bk, choice, library, transport_choice, watchdog,
                       checkpoint)


def start_session(plan: SessionPlan, progress: Reporter = SILENT) -> Session:
    """Allocate what ``plan`` checked: transport buffers and this rank's weights (read from
    the checkpoint, or generated; ``progress`` shows how far). Collective."""
    watchdog, checkpoint, config = plan.watchdog, plan.checkpoint, plan.config
    with watchdog.waiting("set-up"):
        moved = make_transport(plan.transport_choice, plan.backend)
    with watchdog.phase("weights"):
        started = time.perf_counter()
        topo = plan.topo
        with progress("loading weights" if checkpoint is not None else "generating weights",
                      len(topo.layers) * (len(topo.experts) + 1)) as task:
            weights = (load_weights(topo, plan.backend, checkpoint, task)
                       if checkpoint is not None else
                       build_weights(topo, plan.backend, config.seed, config.init,
                                     progress=task))
        engine = Engine(config, plan.topo, plan.backend, moved, weights)
        load = checkpoint.stats if checkpoint is not None else LoadStats(
            seconds=time.perf_counter() - started)
    session = Session(config, plan.topo, plan.backend, moved, engine, plan.library,
                      plan.backend_choice, plan.transport_choice, watchdog,
                      weights_source=describe(config.checkpoint, config.seed, config.init),
                      load=load, progress=progress)
    with watchdog.phase("peak measurement"):
        session.peak_flops, session.peak_source = measure_peak(plan.backend)
    return session


def open_session(config: RunConfig, comm, batch: Batch, layout: str | None = None,
                 backend: str = "auto", transport: str = "auto", new_tokens: int = 0,
                 memory_limit: int | None = None, watchdog: Watchdog | None = None,
                 progress: Reporter = SILENT) -> Session:
    """:func:`plan_session` for ``batch``, then :func:`start_session`. Collective."""
    return start_session(plan_session(config, comm, batch.lengths, layout, backend, transport,
                                      new_tokens, memory_limit, watchdog), progress)


# --- running ---------------------------------------------------------------------------

def trace_session(session: Session, tracer: Tracer, prefix: str = "", offset: int = 0) -> None:
    """Record ``session``'s iterations in ``tracer`` (already aligned), this rank's process
    named ``prefix`` + its rank, stage and expert- or tensor-rank, ``pid = offset + rank``."""
    topo = session.topo
    kind = "tensor" if topo.layout.tp > 1 else "expert"
    tracer.deployment(rank_label(kind, topo.rank, topo.stage, topo.group_rank, prefix),
                      offset)
    session.tracer = tracer


def _plan_trace(session: Session, micro_batches: int, iterations: int, what: str) -> None:
    """Count the spans the schedule will make against the tracer's limit; rank 0 says
    which iterations fit when not all do (trace.Tracer.plan)."""
    if session.tracer is None:
        return
    per = micro_batches * (len(session.topo.layers) * SPANS_PER_LAYER + 8) + 8
    line = session.tracer.plan(per, iterations, what)
    if line is not None and session.topo.rank == 0:
        say(f"spmd-moe: {line}")


@dataclass
class Timing:
    """One timed iteration on one rank. ``exchanges``: overlap.Flight.summary() (seconds
    the non-blocking exchanges were in flight, exposed and hidden)."""

    wall: float
    phases: dict[str, float]
    bytes_sent: dict[str, int]
    counters: dict[str, int]
    rss: int = 0                      # resident bytes after the iteration
    exchanges: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    """Outputs (rank 0 only, ``None`` elsewhere) and this rank's timings."""

    outputs: dict[str, np.ndarray] | None
    timings: list[Timing]
    step_timings: list[Timing] = field(default_factory=list)   # decode steps
    prefill_timing: Timing | None = None                       # decode: the prefill
    expert_counts: np.ndarray | None = None                    # this rank's share [L, E]
    memory: dict[str, int] = field(default_factory=dict)       # RSS bytes (see _memory)
    schedule: Schedule | None = None                           # this rank's prefill


def _memory(before: int, timings: list[Timing]) -> dict[str, int]:
    """RSS before the first timed iteration (or step), after it, after the last, and the
    peak: a run that leaks grows from the second figure to the third."""
    # The kernel's high-water mark is updated from per-thread counters that lag /proc's
    # figure by up to 64 pages: the peak is at least every sample taken.
    return {"rss_before": before, "rss_first": timings[0].rss if timings else before,
            "rss_end": timings[-1].rss if timings else before,
            "peak_rss": max(peak_resident_bytes(), before, *(t.rss for t in timings))}




class WatchedTimer:
    """A backend PhaseTimer whose phases also tell the watchdog where this rank is: the
    phase, and the layer of the stage pass running (the watchdog listens to the timer's
    cursor, trace.PassCursor, which --trace records with each span: one mark for both)."""

    def __init__(self, timer: PhaseTimer, watchdog: Watchdog):
        self.timer, self.watchdog = timer, watchdog
        timer.cursor.listen(watchdog.at_layer)

    @contextlib.contextmanager
    def phase(self, name: str, context=None):
        """``name`` timed (and traced) in ``context`` (default: the running pass's; an
        exchange's own when it is poked or waited), the watchdog told the phase and that
        context's layer."""
        if context is not None:
            self.watchdog.at_layer(context.layer)
        before = self.watchdog.enter(name, name in WAIT_PHASES)
        try:
            with self.timer.phase(name, context):
                yield
        except BaseException:
            self.watchdog.leave(before, failed=True)
            raise
        self.watchdog.leave(before)

    def __getattr__(self, name: str):
        return getattr(self.timer, name)


def _timed(session: Session, fn, label: str = "iteration"):
    """Run ``fn(timer, flight)`` between barriers; returns (its result, Timing). ``timer``
    tells the watchdog where the rank is, and so does ``flight`` (it times every start, test
    and wait of an exchange under the exchange's phase, one of WAIT_PHASES). With a tracer
    the timer keeps its spans, and the iteration (``label``), its barriers and the device
    sync are host spans."""
    world, bk, watchdog, tracer = (session.topo.world, session.backend, session.watchdog,
                                   session.tracer)
    timer = WatchedTimer(bk.timer(), watchdog)
    flight = Flight(timer)
    watchdog.iteration += 1
    entered = time.perf_counter()
    with watchdog.waiting("barrier before iteration"):
        world.Barrier()
    if tracer is not None:
        tracer.arm(timer.timer, bk)
    start = time.perf_counter()
    with watchdog.phase("forward"):
        result = fn(timer, flight)
    computed = time.perf_counter()
    with watchdog.phase("device sync"):
        bk.synchronize()
    synced = time.perf_counter()
    with watchdog.waiting("barrier after iteration"):
        world.Barrier()
    end = time.perf_counter()
    wall = end - start
    if tracer is not None:
        tracer.collect(timer.timer, bk)
        tracer.host_span(label, entered, end,
                         args={"wall_ms": wall * 1e3})
        tracer.host_span("barrier", entered, start)
        tracer.host_span("device sync", computed, synced)
        tracer.host_span("barrier", synced, end)
    return result, Timing(wall, timer.totals(), dict(timer.bytes_sent), dict(timer.counters),
                          rss=resident_bytes(), exchanges=flight.summary())


def run_prefill(session: Session, batch: Batch, warmup: int = 0, iters: int = 1,
                collect: bool = True) -> RunResult:
    """``warmup + iters`` forward passes; outputs of the last gathered on rank 0. Rank 0
    shows progress (``session.progress``) of the warm-up and of the timed iterations."""
    engine, timings = session.engine, []
    rss_start = resident_bytes()
    if session.tracer is not None:
        _plan_trace(session, engine.schedule(batch).count, warmup + iters, "iteration")
    warming = session.progress("warm-up", warmup, each=True)
    timed = None
    for i in range(warmup + iters):
        last = i == warmup + iters - 1
        label = f"warm-up {i + 1}" if i < warmup else f"iteration {i - warmup + 1}"
        out, timing = _timed(session, lambda t, f: engine.prefill(
            batch, t, keep_hidden=collect and last, flight=f), label)
        if i < warmup:
            warming.update(i + 1, f"{timing.wall * 1e3:.1f} ms")
            continue
        if timed is None:
            warming.close()
            timed = session.progress("iteration", iters, each=True)
        timings.append(timing)
        timed.update(i - warmup + 1, f"{timing.wall * 1e3:.1f} ms")
    timed.close()
    memory = _memory(rss_start, timings)
    outputs = gather_prefill(session, batch, out) if collect else None
    return RunResult(outputs, timings, expert_counts=out.expert_counts, memory=memory,
                     schedule=out.schedule)


def run_decode(session: Session, batch: Batch, new_tokens: int,
               eos_id: int | list[int] | None = None,
               collect: bool = True) -> RunResult:
    """Prefill the prompts into the KV cache, then ``new_tokens`` greedy tokens per
    sequence, one decode step at a time. A sequence that emits ``eos_id`` (or one of a list of
    them: checkpoints may name several) stops (its later tokens are -1)."""
    engine, topo = session.engine, session.topo
    rss_start = resident_bytes()
    cache = engine.new_cache(batch, new_tokens)
    micro = engine.decode_micro_batches(batch.batch_size)
    returns: list = []
    if session.tracer is not None:
        _plan_trace(session, max(len(micro), engine.schedule(batch).count), new_tokens,
                    "decode step")

    def after_sampling(chosen: list[np.ndarray], step: int, timer) -> list[np.ndarray]:
        """The tokens step ``step + 1`` embeds (-1 for stopped sequences), sent to the first
        stage. Nothing is sent after the last step: an unreceived message would linger."""
        stops = np.atleast_1d(np.asarray([] if eos_id is None else eos_id, dtype=np.int64))
        inputs = [np.where(np.isin(c, stops), -1, c) for c in chosen]
        if step + 1 < new_tokens:
            returns.extend(engine.return_tokens(inputs, timer))
        return inputs

    def prefill(timer, flight):
        out = engine.prefill(batch, timer, cache, keep_hidden=collect, flight=flight)
        chosen = []
        if out.logits:
            # The prefill's micro-batches (chunks) are not the decode's: regroup the rank's
            # tokens, in sequence order, by decode micro-batch.
            mine = np.concatenate([engine.sample(logits, timer) for logits in out.logits])
            chosen = np.split(mine, np.cumsum([len(seqs) for seqs in micro])[:-1])
        return out, chosen, after_sampling(chosen, 0, timer)

    (out, chosen, inputs), prefill_timing = _timed(session, prefill, "prefill")
    generated = [chosen]
    counts = np.zeros_like(out.expert_counts)
    steps = []
    stepping = session.progress("decode step", new_tokens - 1, each=True)
    for step in range(1, new_tokens):
        def one_step(timer, flight, inputs=inputs):
            new = engine.decode_step(micro, inputs, cache, timer, counts, flight)
            return new, after_sampling(new, step, timer) if topo.is_last_stage else inputs

        (new, inputs), timing = _timed(session, one_step, f"decode step {step}")
        if topo.is_last_stage:
            generated.append(new)
        steps.append(timing)
        stepping.update(step, f"{timing.wall * 1e3:.1f} ms")
    stepping.close()
    with session.watchdog.waiting("token_return"):
        for request in returns:
            request.Wait()
    memory = _memory(rss_start, [prefill_timing, *steps])
    outputs = None
    if collect:
        outputs = gather_prefill(session, batch, out)
        tokens = gather_tokens(session, batch, generated, new_tokens)
        if outputs is not None:
            outputs["tokens"] = tokens
    return RunResult(outputs, [prefill_timing], steps, prefill_timing, out.expert_counts,
                     memory, out.schedule)


# --- gathering outputs on rank 0 -------------------------------------------------------


