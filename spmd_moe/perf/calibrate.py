"""Calibrating the performance model (perfmodel.py) on this machine: the NumPy backend's
kernel rates at the engine's shapes (:func:`measure_cpu_rates`) and MPI's latency and
bandwidth between ranks (:func:`measure_mpi_links`). bin/calibrate-local runs both.
"""
from __future__ import annotations

import numpy as np

from ..core.chunks import prefill_schedule
from ..core.config import Layout, RunConfig
from ..core.costs import attention_core_flops
from ..core.topology import Grid
from .compute import PASS_BYTES

# --- calibrating on this machine (CPU, NumPy backend) ----------------------------------------

def measure_cpu_rates(config: RunConfig, layout: Layout, comm, repeats: int = 5) -> dict:
    """Kernel rates of the NumPy backend on this machine, measured by every rank at once
    (so that ranks sharing cores share them as in a run), at the shapes the engine uses for
    ``config`` and ``layout``: the attention projections' GEMM, the attention core, one
    expert's FFN, an elementwise pass, and a tiny operation's fixed cost. Collective; the
    rates (mean over ranks) as a calibration dict."""
    import time

    from ..backend.array import Backend, BackendChoice
    from ..moe.experts import expert_ffn
    from ..model.blocks import causal_attention

    model, work = config.model, config.workload
    grid = Grid(layout, model, comm.Get_rank())
    bk = Backend(BackendChoice("numpy", "calibration"), model.dtype)
    rng = np.random.default_rng(comm.Get_rank())
    # The engine's largest micro-batch (chunks.py): its chunks' attention reads keys up to
    # start + length each, as the KV cache holds them.
    lengths = np.full(work.batch_size, work.seq_len, dtype=np.int64)
    schedule = prefill_schedule(grid, work, lengths, "numpy")
    largest = max(schedule.micro_batches, key=lambda mb: mb.n_tokens)
    t = max(1, largest.n_tokens)
    d, heads, dh = model.d_model, len(grid.heads), model.head_dim
    width, ff = heads * dh, len(grid.ff_columns)
    stage_tokens = t * (layout.ep if layout.tp == 1 else 1)
    rows = max(1, int(stage_tokens * model.top_k / (layout.ep * len(grid.experts))
                      if layout.tp == 1 else t * model.top_k / model.n_experts))

    def timed(fn) -> float:
        """Mean seconds per call over ``repeats`` back-to-back calls: ranks that share a
        core take turns, and only a mean over several turns sees the share each gets."""
        fn()
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    a = bk.store(rng.standard_normal((t, d), dtype=np.float32))
    w = bk.param(rng.standard_normal((d, width), dtype=np.float32))
    gemm = 2.0 * t * d * width / timed(lambda: bk.matmul(a, w))
    lens = largest.lengths if len(largest.lengths) else np.ones(1, dtype=np.int64)
    first = largest.starts if len(largest.starts) else np.zeros(1, dtype=np.int64)
    q = bk.store(rng.standard_normal((int(lens.sum()), heads, dh), dtype=np.float32))
    q_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    k_lens = first + lens
    kv = bk.store(rng.standard_normal((int(k_lens.sum()), heads, dh), dtype=np.float32))
    k_starts = np.concatenate([[0], np.cumsum(k_lens)[:-1]])
    core = attention_core_flops(lens, width, first)
    attention = core / timed(lambda: causal_attention(bk, q, q_starts, lens, kv, kv, k_starts,
                                                      k_lens, dh ** -0.5))
    x = bk.store(rng.standard_normal((rows, d), dtype=np.float32))
    w1 = bk.param(rng.standard_normal((d, ff), dtype=np.float32))
    w2 = bk.param(rng.standard_normal((ff, d), dtype=np.float32))
    expert = 4.0 * rows * d * ff / timed(lambda: expert_ffn(bk, x, w1, w2))
    big = rng.standard_normal(max(t * d, 1 << 20), dtype=np.float32)
    other = rng.standard_normal(big.shape, dtype=np.float32)
    hbm = PASS_BYTES * big.size / timed(lambda: big * other)
    small = np.ones(16, dtype=np.float32)
    loops = 2000
    op = timed(lambda: [small * small for _ in range(loops)]) / loops
    values = np.array([gemm / 1e12, attention / 1e12, hbm / 1e9, expert / 1e12, op * 1e6])
    mean = np.zeros_like(values)
    from mpi4py import MPI

    comm.Allreduce(values, mean, op=MPI.SUM)
    mean /= comm.Get_size()
    keys = ("gemm_tflops", "attention_tflops", "hbm_gbps", "expert_tflops", "op_us")
    return {"rates": dict(zip(keys, (float(v) for v in mean))),
            "measured": {"backend": "numpy", "dtype": model.dtype, "ranks": comm.Get_size(),
                         "layout": str(layout), "gemm_shape": [t, d, width],
                         "attention": {"chunks": len(lens), "tokens": t,
                                       "keys": int(k_lens.sum()), "heads": heads,
                                       "head_dim": dh},
                         "expert_shape": [rows, d, ff]}}


def measure_mpi_links(comm, sizes: tuple[int, ...] = (8, 1 << 20, 8 << 20),
                      repeats: int = 20) -> dict:
    """Point-to-point latency and bandwidth between ranks 0 and 1 of ``comm`` (ping-pong,
    while the other ranks wait in a barrier), as a cluster's intra-node link. Collective;
    {"latency_us", "bandwidth_gbytes_per_s"} on every rank (zeros on one rank)."""
    import time

    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2:
        return {"latency_us": 0.0, "bandwidth_gbytes_per_s": 0.0}
    times = {}
    for n in sizes:
        buf = np.zeros(n, dtype=np.uint8)
        comm.Barrier()
        if rank in (0, 1):
            other = 1 - rank
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                if rank == 0:
                    comm.Send(buf, dest=other, tag=7)
                    comm.Recv(buf, source=other, tag=7)
                else:
                    comm.Recv(buf, source=other, tag=7)
                    comm.Send(buf, dest=other, tag=7)
                best = min(best, (time.perf_counter() - start) / 2)
            times[n] = best
        comm.Barrier()
    result = None
    if rank == 0:
        latency = times[sizes[0]]
        big = sizes[-1]
        bandwidth = big / max(times[big] - latency, 1e-9)
        result = {"latency_us": latency * 1e6, "bandwidth_gbytes_per_s": bandwidth / 1e9}
    return comm.bcast(result, root=0)
