"""The transport measurement of ``spmd-moe bench --transport-only`` (under ``mpiexec -n P``):
the engine's dispatch and combine of ``seqs x seq_len`` tokens per rank through the chosen
transport (the dispatcher's own steps, their exchanges started and waited as a pass does:
overlap.run_pass), against a raw host ``Alltoallv`` of the same bytes in the same job;
checks that every row came back.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from .bench_shapes import SPEC_TARGETS, TRANSPORT_PHASES, BenchShape, stats
from .layer_step import backend_facts, trace_iteration


def run_transport(comm, bk, transport, shape: BenchShape, iters: int = 3, warmup: int = 1,
                  seed: int = 0, progress=None, tracer=None) -> dict | None:
    """Dispatch and combine of ``shape.tokens`` tokens per rank across ``comm`` (each rank
    owning ``E/P`` experts), timed against a raw host Alltoallv of the same rows both ways.
    Collective; the result on rank 0, None elsewhere."""
    from mpi4py import MPI

    from ..core.topology import block_range
    from ..moe.dispatcher import AlltoallDispatcher
    from ..parallel.overlap import Flight, run_pass

    say = progress or (lambda text: None)
    rank, peers = comm.Get_rank(), comm.Get_size()
    e, k = shape.experts, shape.top_k
    mine = block_range(e, peers, rank)
    dispatcher = AlltoallDispatcher(bk, comm, transport, e, k, mine)
    rng = np.random.default_rng([seed, rank])
    # Each token picks k distinct experts uniformly; weights 1/k, so the weighted sum of the
    # returned rows is the token's own row again: the check that every row came home.
    top = np.argsort(rng.random((shape.tokens, e)), axis=1)[:, :k].astype(np.int32)  # [T, k]
    top_experts = bk.asarray(top)
    weights = bk.asarray(np.full((shape.tokens, k), 1.0 / k, dtype=np.float32))
    x_host = rng.standard_normal((shape.tokens, shape.d_model),
                                 dtype=np.float32).astype(bk.dtype)              # [T, d]
    x = bk.asarray(x_host)

    def round_trip(timer, flight):
        """Dispatch and combine, the received rows standing for the experts' outputs."""
        grouped, plan = yield from dispatcher.dispatch_steps(x, top_experts, timer, flight)
        moe = yield from dispatcher.combine_steps(grouped, plan, weights, timer, flight)
        return moe, plan

    phases: dict[str, list[float]] = {p: [] for p in TRANSPORT_PHASES}
    ours, raw = [], []
    moe = plan = None
    for i in range(warmup + iters):
        timer = bk.timer()
        bk.synchronize()
        comm.Barrier()
        if tracer is not None:
            tracer.arm(timer, bk)
        t0 = time.perf_counter()
        flight = Flight(timer)
        moe, plan = run_pass(round_trip(timer, flight), flight)              # [T, d] f32
        bk.synchronize()
        elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        seconds = timer.totals()
        if tracer is not None:
            trace_iteration(tracer, timer, bk, t0, i, warmup)
        raw_elapsed = _raw_alltoallv(comm, transport, plan, shape.d_model, bk.dtype)
        say(f"{'warm-up' if i < warmup else 'iteration'}: dispatch+combine "
            f"{elapsed * 1e3:.2f} ms, raw Alltoallv x2 {raw_elapsed * 1e3:.2f} ms")
        if i >= warmup:
            ours.append(elapsed * 1e3)
            raw.append(raw_elapsed * 1e3)
            for p in TRANSPORT_PHASES:
                phases[p].append(seconds.get(p, 0.0) * 1e3)
    error = float(np.max(np.abs(bk.to_host(moe) - x_host.astype(np.float32)))) \
        if shape.tokens else 0.0
    row_bytes = shape.d_model * np.dtype(bk.dtype).itemsize
    others = np.arange(peers) != rank
    mine_bytes = {"dispatch": int(plan.send_counts_host[others].sum()) * row_bytes,
                  "combine": int(plan.recv_counts_host[others].sum()) * row_bytes}
    gathered = comm.gather({"phases": phases, "bytes": mine_bytes, "error": error,
                            "rows_received": int(plan.recv_counts_host.sum())}, root=0)
    if rank != 0:
        return None
    phase_max = {p: stats([max(g["phases"][p][i] for g in gathered) for i in range(iters)])
                 for p in TRANSPORT_PHASES}
    ours_stats, raw_stats = stats(ours), stats(raw)
    spec = SPEC_TARGETS["dispatch_combine_vs_raw_alltoallv"]
    ratio = ours_stats["mean"] / raw_stats["mean"] if raw_stats["mean"] else None
    return {
        "kind": "transport",
        "command": " ".join(sys.argv),
        "world_size": peers,
        "backend": backend_facts(bk),
        "transport": {"name": transport.name, "reason": transport.reason},
        "shape": {"tokens_per_rank": shape.tokens, "d_model": shape.d_model,
                  "experts": e, "top_k": k, "dtype": shape.dtype,
                  "routed_rows_per_rank": shape.routed_rows},
        "iterations": iters,
        "warmup": warmup,
        "dispatch_combine_ms": ours_stats,
        "raw_alltoallv_ms": raw_stats,
        "ratio": ratio,
        "target": {"required": spec["required"], "aim": spec["aim"],
                   "status": "n/a" if ratio is None else
                   ("met" if ratio <= spec["required"] else "missed")},
        "phases_max_ms": phase_max,
        "bytes_sent_per_rank": {p: stats([g["bytes"][p] for g in gathered])
                                for p in ("dispatch", "combine")},
        "rows_received": [g["rows_received"] for g in gathered],
        "roundtrip_max_abs_error": max(g["error"] for g in gathered),
        "roundtrip_ok": all(g["error"] == 0.0 for g in gathered),
        "spec": SPEC_TARGETS,
    }


def _raw_alltoallv(comm, transport, plan, width: int, dtype) -> float:
    """Seconds (max over ranks) of two host Alltoallv of the plan's rows, 16-bit words for
    bf16, rows as a contiguous datatype, as the transports send them."""
    from mpi4py import MPI

    from ..parallel.transport import displacements

    item = np.dtype(dtype).itemsize
    words = np.dtype(f"u{item}")
    send = np.zeros((int(plan.send_counts_host.sum()), width), dtype=words)
    recv = np.empty((int(plan.recv_counts_host.sum()), width), dtype=words)
    rows = transport.row_type(item, width)
    sc, rc = plan.send_counts_host, plan.recv_counts_host
    comm.Barrier()
    t0 = time.perf_counter()
    comm.Alltoallv([send, (sc, displacements(sc)), rows], [recv, (rc, displacements(rc)), rows])
    comm.Alltoallv([recv, (rc, displacements(rc)), rows], [send, (sc, displacements(sc)), rows])
    return comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
