"""The Python API: open a session on a communicator, run prefill or decode, get outputs.

The CLI is a thin layer over these; tests call them directly. Every set-up step that can
reject user input is *collective* (errors.collective): a rank that finds a problem makes
every rank raise the same error, so no rank walks on into a collective the others never
reach. Failures after set-up are bugs or faults; the CLI aborts the job on them.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend, BackendChoice, choose_backend
from .config import Layout, RunConfig
from .costs import GIB, rank_cost
from .data import Batch
from .chunks import Schedule
from .engine import Engine
from .errors import LayoutError, collective
from .overlap import Flight
from .topology import Grid, Topology
from .transport import (MpiLibrary, TransportChoice, choose_transport, make_transport,
                        mpi_library, nccl_available)


@dataclass
class Session:
    """Everything one rank needs to run: config, topology, backend, transport, engine."""

    config: RunConfig
    topo: Topology
    backend: Backend
    transport: object
    engine: Engine
    library: MpiLibrary
    backend_choice: BackendChoice
    transport_choice: TransportChoice
    peak_flops: float = 0.0
    peak_source: str = ""

    def close(self) -> None:
        self.transport.free()
        self.topo.free()


def available_memory(choice: BackendChoice, node_size: int) -> tuple[int, str]:
    """Bytes this rank may use: the device's free memory over the ranks sharing it, or the
    host's available memory over the node's ranks."""
    if choice.name == "cupy":
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        sharing = -(-node_size // max(1, choice.device_count))
        return free // sharing, f"GPU {choice.device_id} free memory / {sharing} rank(s)"
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62, "host memory unknown"
    return free // node_size, f"host MemAvailable / {node_size} rank(s) on this node"


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


def open_session(config: RunConfig, comm, batch: Batch, layout: str | None = None,
                 backend: str = "auto", transport: str = "auto", new_tokens: int = 0,
                 memory_limit: int | None = None) -> Session:
    """Build topology, backend, transport and this rank's weights. Collective on ``comm``.

    ``layout`` overrides the config's (``"ep=4,pp=2"``); ``memory_limit`` (bytes) overrides
    the device's free memory in the pre-allocation check.
    """
    size = comm.Get_size()
    parsed = collective(comm, lambda: Layout.parse(layout or config.layout, size).validate(
        config.model, size))
    topo = Topology(comm, parsed, config.model)
    choice = collective(comm, choose_backend, backend, topo.node_rank, topo.node_size)
    bk = Backend(choice, config.model.dtype)
    library = mpi_library()
    transport_choice = collective(comm, choose_transport, transport, bk.name, library,
                                  bk.on_gpu and nccl_available())

    def memory_check() -> None:
        limit, source = ((memory_limit, "--memory-limit") if memory_limit is not None
                         else available_memory(choice, topo.node_size))
        check_memory(config, topo, batch.lengths, bk.name, new_tokens, limit, source)

    collective(comm, memory_check)
    moved = make_transport(transport_choice, bk, comm)
    engine = Engine(config, topo, bk, moved)
    session = Session(config, topo, bk, moved, engine, library, choice, transport_choice)
    session.peak_flops, session.peak_source = measure_peak(bk)
    return session


# --- running ---------------------------------------------------------------------------

@dataclass
class Timing:
    """One timed iteration on one rank. ``exchanges``: overlap.Flight.summary() (seconds
    the non-blocking exchanges were in flight, exposed and hidden)."""

    wall: float
    phases: dict[str, float]
    bytes_sent: dict[str, int]
    counters: dict[str, int]
    exchanges: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    """Outputs (rank 0 only, ``None`` elsewhere) and this rank's timings."""

    outputs: dict[str, np.ndarray] | None
    timings: list[Timing]
    step_timings: list[Timing] = field(default_factory=list)   # decode steps
    prefill_timing: Timing | None = None                       # decode: the prefill
    expert_counts: np.ndarray | None = None                    # this rank's share [L, E]
    schedule: Schedule | None = None                           # this rank's prefill


def _progress(session: Session, label: str, index: int, total: int, seconds: float,
              always: bool) -> None:
    if session.topo.rank == 0 and (always or seconds > 1.0):
        print(f"spmd-moe: {label} {index}/{total}: {seconds * 1e3:.1f} ms", file=sys.stderr,
              flush=True)


def _timed(session: Session, fn):
    """Run ``fn(timer, flight)`` between barriers; returns (its result, Timing)."""
    world, bk = session.topo.world, session.backend
    timer = bk.timer()
    flight = Flight(timer)
    world.Barrier()
    start = time.perf_counter()
    result = fn(timer, flight)
    bk.synchronize()
    world.Barrier()
    wall = time.perf_counter() - start
    return result, Timing(wall, timer.totals(), dict(timer.bytes_sent), dict(timer.counters),
                          flight.summary())


def run_prefill(session: Session, batch: Batch, warmup: int = 0, iters: int = 1,
                collect: bool = True, progress: bool = False) -> RunResult:
    """``warmup + iters`` forward passes; outputs of the last gathered on rank 0."""
    engine, timings = session.engine, []
    for i in range(warmup + iters):
        last = i == warmup + iters - 1
        out, timing = _timed(session, lambda t, f: engine.prefill(
            batch, t, keep_hidden=collect and last, flight=f))
        if i >= warmup:
            timings.append(timing)
            _progress(session, "iteration", i - warmup + 1, iters, timing.wall, progress)
    outputs = gather_prefill(session, batch, out) if collect else None
    return RunResult(outputs, timings, expert_counts=out.expert_counts, schedule=out.schedule)


def run_decode(session: Session, batch: Batch, new_tokens: int, eos_id: int | None = None,
               collect: bool = True, progress: bool = False) -> RunResult:
    """Prefill the prompts into the KV cache, then ``new_tokens`` greedy tokens per
    sequence, one decode step at a time. A sequence that emits ``eos_id`` stops (its later
    tokens are -1)."""
    engine, topo = session.engine, session.topo
    cache = engine.new_cache(batch, new_tokens)
    micro = engine.decode_micro_batches(batch.batch_size)
    returns: list = []

    def after_sampling(chosen: list[np.ndarray], step: int, timer) -> list[np.ndarray]:
        """The tokens step ``step + 1`` embeds (-1 for stopped sequences), sent to the first
        stage. Nothing is sent after the last step: an unreceived message would linger."""
        inputs = [np.where(c == eos_id, -1, c) if eos_id is not None else c for c in chosen]
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

    (out, chosen, inputs), prefill_timing = _timed(session, prefill)
    generated = [chosen]
    counts = np.zeros_like(out.expert_counts)
    steps = []
    for step in range(1, new_tokens):
        def one_step(timer, flight, inputs=inputs):
            new = engine.decode_step(micro, inputs, cache, timer, counts, flight)
            return new, after_sampling(new, step, timer) if topo.is_last_stage else inputs

        (new, inputs), timing = _timed(session, one_step)
        if topo.is_last_stage:
            generated.append(new)
        steps.append(timing)
        _progress(session, "decode step", step, new_tokens - 1, timing.wall, progress)
    for request in returns:
        request.Wait()
    outputs = None
    if collect:
        outputs = gather_prefill(session, batch, out)
        tokens = gather_tokens(session, batch, generated, new_tokens)
        if outputs is not None:
            outputs["tokens"] = tokens
    return RunResult(outputs, [prefill_timing], steps, prefill_timing, out.expert_counts,
                     out.schedule)


# --- gathering outputs on rank 0 -------------------------------------------------------

def _contributors(session: Session, batch_size: int) -> list[range]:
    """For each world rank, the sequences whose outputs it sends to rank 0 (maybe none)."""
    topo = session.topo
    out = []
    for rank in range(topo.size):
        grid = Grid(topo.layout, topo.model, rank)
        useful = grid.is_last_stage and grid.writes_outputs
        out.append(grid.sequences(batch_size) if useful else range(0))
    return out


def _gather_rows(session: Session, rows: np.ndarray, counts: list[int], width: int,
                 dtype: np.dtype) -> np.ndarray | None:
    """Gatherv of [n, width] rows to world rank 0 (counts in rows)."""
    world, transport = session.topo.world, session.transport
    row_type = transport.row_type(dtype.itemsize, width)
    rows = np.ascontiguousarray(rows, dtype=dtype).reshape(-1, width)
    recv = None
    if world.Get_rank() == 0:
        counts_arr = np.asarray(counts, dtype=np.int64)
        starts = np.zeros_like(counts_arr)
        np.cumsum(counts_arr[:-1], out=starts[1:])
        recv = np.empty((int(counts_arr.sum()), width), dtype=dtype)
        world.Gatherv(transport.words(rows), [transport.words(recv), (counts_arr, starts),
                                              row_type], root=0)
    else:
        world.Gatherv([transport.words(rows), rows.shape[0], row_type], None, root=0)
    return recv


def gather_prefill(session: Session, batch: Batch, out):
    """``hidden`` float32 [B, S, d] (zero at padding), ``logits`` float32 [B, V] and
    ``expert_counts`` int64 [L, E] on world rank 0; ``None`` on other ranks."""
    topo, bk, model = session.topo, session.backend, session.config.model
    world = topo.world
    counts = np.zeros_like(out.expert_counts)
    world.Reduce(out.expert_counts, counts, root=0)
    lengths = batch.lengths
    sources = _contributors(session, batch.batch_size)
    mine = sources[topo.rank]
    d, vocab = model.d_model, model.vocab_size
    if len(mine):
        logits = np.concatenate([bk.to_host(x) for x in out.logits]).astype(np.float32)
    else:
        logits = np.zeros((0, vocab), dtype=np.float32)
    all_logits = _gather_rows(session, logits, [len(s) for s in sources], vocab,
                              np.dtype(np.float32))
    if len(mine):
        hidden = np.concatenate([bk.to_host(x) for x in out.hidden])
    else:
        hidden = np.zeros((0, d), dtype=bk.dtype)
    token_counts = [int(lengths[s.start:s.stop].sum()) for s in sources]
    hidden_rows = _gather_rows(session, hidden, token_counts, d, bk.dtype)
    if topo.rank != 0:
        return None
    order = np.concatenate([np.arange(s.start, s.stop) for s in sources])
    result = {"logits": np.empty((batch.batch_size, vocab), dtype=np.float32),
              "expert_counts": counts}
    result["logits"][order] = all_logits
    full = np.zeros((batch.batch_size, batch.seq_len, d), dtype=np.float32)
    row = 0
    for seq in order:
        n = int(lengths[seq])
        full[seq, batch.seq_len - n:] = hidden_rows[row:row + n].astype(np.float32)
        row += n
    result["hidden"] = full
    return result


def gather_tokens(session: Session, batch: Batch, generated: list[list[np.ndarray]],
                  new_tokens: int) -> np.ndarray | None:
    """Greedy tokens int64 [B, N] on world rank 0 (-1 after a sequence stopped)."""
    sources = _contributors(session, batch.batch_size)
    mine = sources[session.topo.rank]
    if len(mine):
        steps = [np.concatenate(step) for step in generated]         # N x [b]
        tokens = np.stack(steps, axis=1)                              # [b, N]
    else:
        tokens = np.zeros((0, new_tokens), dtype=np.int64)
    rows = _gather_rows(session, tokens, [len(s) for s in sources], new_tokens,
                        np.dtype(np.int64))
    if session.topo.rank != 0:
        return None
    order = np.concatenate([np.arange(s.start, s.stop) for s in sources])
    result = np.empty((batch.batch_size, new_tokens), dtype=np.int64)
    result[order] = rows
    return result
