"""One rank's layer step, timed phase by phase (``spmd-moe bench``'s main measurement): the
engine's own layer (Engine.layer_steps), so the bench times the code a run executes.

:class:`LayerStep` is rank 0 of an expert-parallel layout of ``shape.experts`` ranks, alone
(:class:`OneRankShare`): attention over ``shape.seqs`` sequences, the router, the sort and
gather of the T*k routed rows, ``shape.rows`` rows through its one expert, the weighted
un-permutation and the residual, through a :class:`LoopbackDispatcher` that stands in for
the exchanges (transport_bench.py times those). :func:`run_layer_step` times it with the
backend's PhaseTimer (CUDA events on a GPU, the host clock on NumPy) in the engine's phases
(core/phases.py), the attention core alone (the engine's ``causal_attention`` on the same
shapes) and both attention tile heights; the result holds means, the FLOPs, the matmul
floor and, when ``import torch`` works, the PyTorch peer (torch_peer.py) with SPEC §7's
targets.
"""
from __future__ import annotations

import platform
import sys
from dataclasses import asdict

import numpy as np

from ..core.config import Layout, RunConfig, WorkloadConfig
from ..core.errors import ConfigError
from ..core.topology import Grid
from ..moe.dispatcher import DispatchPlan, Dispatcher
from ..parallel.overlap import CHECKPOINT
from .bench_shapes import (LAYER_PHASES, LOOPBACK_PHASES, SPEC_TARGETS, BenchShape, bench_flops,
                           estimate_bytes, stats)
from .torch_peer import torch_peer


class OneRankShare(Grid):
    """Rank 0 of an expert-parallel layout of ``experts`` ranks and one stage, alone: its
    layers, its one expert of each, all the attention; communicators of one rank (its
    dispatcher loops back)."""

    def __init__(self, model, experts: int):
        from mpi4py import MPI

        super().__init__(Layout(ep=experts, tp=1, pp=1), model, 0)
        for name, value in (("size", 1), ("stage_comms", (MPI.COMM_SELF, MPI.COMM_SELF)),
                            ("pipe_comm", MPI.COMM_SELF)):
            object.__setattr__(self, name, value)


class LoopbackDispatcher(Dispatcher):
    """One rank's share of dispatch and combine without the exchanges: the rank's own routed
    rows stand for what its peers send its expert (balanced routing), so the sort, the
    gather, the counts' copy, the experts and the weighted un-permutation are the engine's
    (Dispatcher's), and the count exchange, dispatch and combine are loop-backs: its rows,
    cycled to ``expert_rows * R / routed_rows`` rows when the bench asks for another
    number of expert rows (``--rows``), and cycled back."""

    def __init__(self, bk, model, shape: BenchShape):
        from mpi4py import MPI

        super().__init__(bk, MPI.COMM_SELF, None, model.n_experts, model.top_k, range(1))
        self.shape = shape
        self._cycles: dict[int, tuple] = {}

    def _cycle(self, routed: int):
        """(to the expert, back) index arrays for ``routed`` rows, or None: the same."""
        if routed not in self._cycles:
            rows = max(1, round(self.shape.expert_rows * routed / self.shape.routed_rows))
            self._cycles[routed] = (None if rows == routed or not routed else (
                self.bk.asarray(np.arange(rows) % routed),
                self.bk.asarray(np.arange(routed) % rows)), rows if routed else 0)
        return self._cycles[routed]

    def dispatch_steps(self, b, top_experts, timer, flight, meanwhile=None):
        routing, send = self._sorted_rows(b, top_experts, timer)
        yield CHECKPOINT
        if meanwhile is not None:
            meanwhile()
        with timer.phase("count_exchange"):
            tokens = self.tokens_per_expert(routing)
        cycle, rows = self._cycle(send.shape[0])
        with timer.phase("dispatch"):
            received = send if cycle is None else self.bk.take_rows(send, cycle[0])
        return received, DispatchPlan(routing.order, tokens, np.array([rows]))

    def combine_steps(self, rows, plan: DispatchPlan, weights, timer, flight):
        yield from ()
        cycle, _ = self._cycle(plan.order.shape[0])
        with timer.phase("combine"):
            returned = rows if cycle is None else self.bk.take_rows(rows, cycle[1])
        with timer.phase("unpermute"):
            return self.unpermute(returned, plan.order, weights)


class LayerStep:
    """One layer of one rank (module docstring) with its inputs, built on ``bk``; :meth:`run`
    does one step under a PhaseTimer.

    With ``shape.chunk_tokens`` the step is the engine's chunked prefill of the same work:
    the sequences cut into micro-batches of that many tokens (chunks.chunked), each chunk's
    attention reading its sequence's earlier keys from the KV cache; the phases add up over
    the micro-batches."""

    def __init__(self, bk, shape: BenchShape, seed: int = 0):
        from ..core.chunks import chunked
        from ..engine.engine import Engine
        from ..model.blocks import Rope, pack
        from ..model.kv_cache import KVCache

        self.bk, self.shape = bk, shape
        model = shape.model()
        self.model = model
        loopback = LoopbackDispatcher(bk, model, shape)
        config = RunConfig(model, WorkloadConfig(batch_size=shape.seqs, seq_len=shape.seq_len),
                           seed=seed, init="device")
        self.engine = Engine(config, OneRankShare(model, shape.experts), bk, None,
                             dispatchers=[loopback, loopback])
        rng = bk.xp.random.default_rng(seed + 1)
        self.x = rng.standard_normal((shape.tokens, shape.d_model),
                                     dtype=np.float32).astype(bk.dtype)       # [T, d]
        self.counts = np.zeros((1, model.n_experts), dtype=np.int64)
        lengths = np.full(shape.seqs, shape.seq_len, dtype=np.int64)
        budget = shape.chunk_tokens or shape.tokens
        self.cache = None
        if budget < shape.tokens:
            self.cache = KVCache(bk, range(1), 0, shape.seqs, shape.seq_len, model.kv_heads,
                                 model.head_dim)
        # Per micro-batch: packed chunks, their rows of x (untimed glue), RoPE.
        self.micro = []
        for mb in chunked(range(shape.seqs), lengths, budget):
            packed = pack(bk, mb.seqs, mb.lengths, mb.starts)
            rows_of_x = np.concatenate([np.arange(a, a + n) + s * shape.seq_len for s, a, n in
                                        zip(mb.seqs, mb.starts, mb.lengths)])
            self.micro.append((packed, None if budget >= shape.tokens
                               else bk.asarray(rows_of_x),
                               Rope(bk, packed.positions, self.engine.rope,
                                    self.engine.inv_freq)))

    @property
    def micro_batches(self) -> int:
        return len(self.micro)

    def run(self, timer):
        """One step; returns the layer output [T, d] (storage dtype)."""
        from ..parallel.overlap import Flight, run_pass

        flight, bk, outs = Flight(timer), self.bk, []
        for packed, rows_of_x, rope in self.micro:
            x = self.x if rows_of_x is None else bk.take_rows(self.x, rows_of_x)
            outs.append(run_pass(self.engine.layer_steps(0, x, packed, rope, timer, flight,
                                                         self.cache, self.counts), flight))
            if self.cache is not None:
                self.cache.advance(packed)
        return outs[0] if len(outs) == 1 else bk.xp.concatenate(outs)


def run_layer_step(bk, shape: BenchShape, iters: int = 3, warmup: int = 1, seed: int = 0,
                   peer: str = "auto", memory_limit: int | None = None,
                   progress=None, tracer=None) -> dict:
    """The layer-step measurement on ``bk``; returns the result dict (see module doc).
    ``tracer`` (trace.Tracer): each iteration's phases as spans."""
    from ..backend.array import available_memory
    from ..engine.runner import measure_peak

    shape.validate()
    say = progress or (lambda text: None)
    need = estimate_bytes(shape, bk.on_gpu)
    limit, source = ((memory_limit, "--memory-limit") if memory_limit is not None
                     else available_memory(bk.choice, 1))
    if need > limit:
        raise ConfigError("bench", f"these shapes need about {need / 2**30:.1f} GiB but "
                                   f"{limit / 2**30:.1f} GiB is available ({source}); pass "
                                   "smaller --seqs/--seq-len/--rows/--d-model/--d-ff")
    say("measuring the matmul peak")
    peak, peak_source = measure_peak(bk)
    say("building weights and inputs")
    step = LayerStep(bk, shape, seed)
    timed = LAYER_PHASES + LOOPBACK_PHASES
    phases: dict[str, list[float]] = {p: [] for p in timed}
    walls: list[float] = []
    for i in range(warmup + iters):
        timer = bk.timer()
        if tracer is not None:
            tracer.arm(timer, bk)
            began = tracer.now()
        with timer.phase("step"):      # encloses the step's own phases
            out = step.run(timer)
        seconds = timer.totals()
        if tracer is not None:
            trace_iteration(tracer, timer, bk, began, i, warmup)
        wall = seconds["step"] * 1e3
        say(f"{'warm-up' if i < warmup else 'iteration'} {i + 1 - (warmup if i >= warmup else 0)}"
            f": {wall:.1f} ms")
        if i >= warmup:
            walls.append(wall)
            for p in timed:
                phases[p].append(seconds.get(p, 0.0) * 1e3)
    finite = bool(np.isfinite(bk.to_host(out[:4].astype(np.float32))).all())
    flops = bench_flops(shape)
    result = _layer_result(bk, shape, iters, warmup, phases, walls, flops, peak, peak_source)
    result["micro_batches"] = step.micro_batches
    result["output_finite"] = finite
    del step, out
    if bk.on_gpu:
        bk.xp.get_default_memory_pool().free_all_blocks()
    say("timing the attention core")
    result["attention_core_ms"] = time_attention_core(bk, shape, iters, warmup, seed)
    core = result["attention_core_ms"]["mean"]
    if core > 0:
        result["tflops"]["attention_core"] = flops["attention_core"] / (core / 1e3) / 1e12
        result["mfu"]["attention_core"] = (result["tflops"]["attention_core"] * 1e12 / peak
                                           if peak else 0.0)
    say("timing the attention tile heights")
    result["attention_tiles"] = time_attention_tiles(bk, shape, iters, warmup, seed)
    if bk.on_gpu:
        bk.xp.get_default_memory_pool().free_all_blocks()
    if peer == "auto" and not shape.spec_layer:
        result["peer"] = {"available": False, "reason": "the PyTorch peer implements SPEC "
                                                        "§1's layer only (MHA, GELU experts); "
                                                        f"not the {shape.family.family} family"}
    elif peer == "auto":
        say("timing the PyTorch peer")
        result["peer"] = torch_peer(shape, iters, warmup, bk.on_gpu, seed)
    else:
        result["peer"] = {"available": False, "reason": "--peer none"}
    result["targets"] = layer_targets(result)
    return result


def _attention_inputs(bk, shape: BenchShape, seed: int):
    """Random q [T, H, Dh], k and v [T, Hk, Dh] of the step's shapes; sequence starts and
    lengths (host int64 [B])."""
    n, heads, kv_heads, dh = shape.tokens, shape.heads, shape.model().kv_heads, shape.head_dim
    rng = bk.xp.random.default_rng(seed + 2)
    q, k, v = (rng.standard_normal((n, h, dh), dtype=np.float32).astype(bk.dtype)
               for h in (heads, kv_heads, kv_heads))
    starts = np.arange(shape.seqs, dtype=np.int64) * shape.seq_len
    lengths = np.full(shape.seqs, shape.seq_len, dtype=np.int64)
    return q, k, v, starts, lengths


def time_attention_core(bk, shape: BenchShape, iters: int, warmup: int, seed: int = 0) -> dict:
    """The attention core alone, as the engine calls it (model.blocks.causal_attention: the
    fused kernel where the backend has it), on random q, k, v of the step's shapes, timed
    as the step's phases are: what SPEC §7 compares with PyTorch's SDPA."""
    from ..model.blocks import causal_attention

    q, k, v, starts, lengths = _attention_inputs(bk, shape, seed)
    times = []
    for i in range(warmup + iters):
        timer = bk.timer()
        with timer.phase("attention_core"):
            causal_attention(bk, q, starts, lengths, k, v, starts, lengths,
                             shape.head_dim ** -0.5)                            # [T, d]
        if i >= warmup:
            times.append(timer.totals()["attention_core"] * 1e3)
    return stats(times)


def time_attention_tiles(bk, shape: BenchShape, iters: int, warmup: int, seed: int = 0) -> dict:
    """The layer step's attention core (``seqs`` causal sequences of ``seq_len``) on the
    fused kernel with each tile height, on the same random q, k, v, timed as the step's
    phases are; which height the schedule picks; and whether the heights agree (each row's
    arithmetic is the same, so the outputs should be identical). Without the fused kernels,
    or for float32 (64-row tiles only), says why not."""
    if bk.kernels is None or not bk.kernels.fused_attention:
        what = "kernels" if bk.kernels is None else "attention"
        return {"available": False, "reason": f"no fused {what}: {bk.kernels_reason}"}
    if shape.dtype != "bfloat16":
        return {"available": False, "reason": "float32 attention has 64-query tiles only"}
    from ..backend.kernels.schedule import TILE_ROWS, tile_rows

    q, k, v, starts, lengths = _attention_inputs(bk, shape, seed)
    heads, dh = shape.heads, shape.head_dim
    result = {"available": True, "chosen": tile_rows(lengths, heads, bk.kernels.n_sm,
                                                     shape.dtype),
              "flops": bench_flops(shape)["attention_core"], "ms": {}, "tflops": {}}
    outputs = {}
    for rows in TILE_ROWS:
        times = []
        for i in range(warmup + iters):
            timer = bk.timer()
            with timer.phase("attention_core"):
                out = bk.kernels.attention(q, starts, lengths, k, v, starts, lengths,
                                           dh ** -0.5, tile_rows=rows)          # [T, d]
            if i >= warmup:
                times.append(timer.totals()["attention_core"] * 1e3)
        result["ms"][str(rows)] = stats(times)
        result["tflops"][str(rows)] = result["flops"] / (result["ms"][str(rows)]["mean"]
                                                          / 1e3) / 1e12
        outputs[rows] = out
    # Rows are computed alike by both heights (only split-K, which long prefill does not
    # use, would cut the key range differently): identical bits are expected.
    xp = bk.xp
    first, *others = (outputs[rows] for rows in TILE_ROWS)
    result["outputs_identical"] = all(bool((first.view(np.uint16) == o.view(np.uint16)).all())
                                      for o in others)
    base = first.astype(np.float32)
    result["outputs_max_rel_diff"] = max(
        float(xp.linalg.norm(o.astype(np.float32) - base) / max(float(xp.linalg.norm(base)),
                                                                1e-30)) for o in others)
    return result


def _layer_result(bk, shape, iters, warmup, phases, walls, flops, peak, peak_source) -> dict:
    per_iter_step = [sum(phases[p][i] for p in LAYER_PHASES) for i in range(iters)]
    phase_stats = {p: stats(phases[p]) for p in LAYER_PHASES}
    flops_out = dict(flops)
    flops_out["step"] = sum(flops[p] for p in LAYER_PHASES)
    tflops, mfu = {}, {}
    for name, ms in list(((p, phase_stats[p]["mean"]) for p in LAYER_PHASES)) + [
            ("step", float(np.mean(per_iter_step)))]:
        if flops_out[name] and ms > 0:
            tflops[name] = flops_out[name] / (ms / 1e3) / 1e12
            mfu[name] = tflops[name] * 1e12 / peak if peak else 0.0
    return {
        "kind": "layer_step",
        "command": " ".join(sys.argv),
        "backend": backend_facts(bk),
        "shape": {**asdict(shape), "tokens": shape.tokens, "routed_rows": shape.routed_rows,
                  "expert_rows": shape.expert_rows, "head_dim": shape.head_dim},
        "iterations": iters,
        "warmup": warmup,
        "phases_ms": phase_stats,
        "loopback_ms": {p: stats(phases[p]) for p in LOOPBACK_PHASES},
        "step_ms": stats(per_iter_step),
        "step_wall_ms": stats(walls),
        "flops": flops_out,
        "tflops": tflops,
        "peak": {"tflops": peak / 1e12, "source": peak_source},
        "mfu": mfu,
        "floor_ms": flops_out["step"] / peak * 1e3 if peak else None,
        "spec": SPEC_TARGETS,
    }


def backend_facts(bk) -> dict:
    return {"name": bk.name, "reason": bk.choice.reason,
            "device": bk.choice.device_name or platform.processor() or platform.machine(),
            "shared_device": bk.choice.shared_device,
            "kernels": bk.kernels is not None, "kernels_reason": bk.kernels_reason,
            "matmul_path": getattr(bk, "matmul_path", "")}


def _target(name: str, ours: float | None, reference: float | None, what: str,
            spec_key: str) -> dict:
    spec = SPEC_TARGETS[spec_key]
    row = {"name": name, "ours_ms": ours, "reference": what, "reference_ms": reference,
           "required": spec["required"], "aim": spec["aim"]}
    if ours is None or reference is None or not reference:
        row.update(ratio=None, status="n/a: no reference measured")
        return row
    ratio = ours / reference
    row["ratio"] = ratio
    if spec["required"] is not None and ratio > spec["required"]:
        row["status"] = "missed"
    elif ratio <= spec["aim"]:
        row["status"] = "aim met"
    else:
        row["status"] = "required met, aim not" if spec["required"] is not None else "aim not met"
    return row


def layer_targets(result: dict) -> list[dict]:
    """SPEC §7's layer-step targets as ratios ours / reference (lower is better)."""
    peer = result.get("peer", {})
    peer_ms = {k: v["mean"] for k, v in peer.get("phases_ms", {}).items()
               if isinstance(v, dict) and "mean" in v}
    ours = result["phases_ms"]
    tiles = result.get("attention_tiles", {})
    by_tile = [_target(f"attention, {rows}-query tiles vs SDPA", st["mean"], peer_ms.get("sdpa"),
                       "torch scaled_dot_product_attention, causal (same run)",
                       "attention_vs_sdpa")
               for rows, st in tiles.get("ms", {}).items()]
    return [
        _target("whole step vs PyTorch eager", result["step_ms"]["mean"],
                peer_ms.get("eager_step"), "PyTorch eager step (same run)",
                "step_vs_pytorch_eager"),
        _target("attention vs SDPA", result.get("attention_core_ms", {}).get("mean"),
                peer_ms.get("sdpa"),
                "torch scaled_dot_product_attention, causal (same run)", "attention_vs_sdpa"),
        *by_tile,
        _target("expert FFN vs two GEMMs", ours["experts"]["mean"], peer_ms.get("ffn_gemms"),
                "two plain torch bf16 GEMMs (same run)", "expert_ffn_vs_two_gemms"),
        _target("whole step vs matmul floor", result["step_ms"]["mean"], result["floor_ms"],
                "step FLOPs at the peak measured in this run", "step_vs_floor"),
    ]


def trace_iteration(tracer, timer, bk, began: float, i: int, warmup: int) -> None:
    """Iteration ``i``'s phases into ``tracer`` after its ``totals()`` (device synced), and
    the iteration itself as a host span."""
    bk.synchronize()
    tracer.collect(timer, bk)
    label = f"warm-up {i + 1}" if i < warmup else f"iteration {i - warmup + 1}"
    tracer.host_span(label, began, tracer.now())
