"""One rank's layer step, timed phase by phase (``spmd-moe bench``'s main measurement).

:func:`run_layer_step` builds a :class:`LayerStep` on a real backend: attention over
``shape.seqs`` sequences, the router, the permutation of the T*k routed rows, ``shape.rows``
rows through one expert, un-permutation and the residual (the Alltoallv in between is
transport_bench's). Per-phase times come from the backend's PhaseTimer (CUDA events on a
GPU, the host clock on NumPy); the result holds means, the FLOPs, the matmul floor and,
when ``import torch`` works, the PyTorch peer (torch_peer.py) with SPEC §7's targets.
"""
from __future__ import annotations

import platform
import sys
from dataclasses import asdict

import numpy as np

from ..core.errors import ConfigError
from .bench_shapes import (ATTENTION_PHASES, LAYER_PHASES, SPEC_TARGETS, BenchShape,
                           estimate_bytes, layer_flops, stats)
from .torch_peer import torch_peer


class LayerStep:
    """One layer of one rank (expert 0 of a ``shape.experts``-rank expert-parallel layout)
    with its inputs, built on ``bk``; :meth:`run` does one step under a PhaseTimer.

    With ``shape.chunk_tokens`` the step is the engine's chunked prefill of the same work:
    the sequences cut into micro-batches of that many tokens (chunks.chunked), each chunk's
    attention reading its sequence's earlier keys from a KV cache, each micro-batch's share
    of the expert rows through the expert; the phases add up over the micro-batches."""

    def __init__(self, bk, shape: BenchShape, seed: int = 0):
        from mpi4py import MPI

        from ..core.chunks import chunked
        from ..core.config import Layout
        from ..moe.dispatcher import Dispatcher
        from ..engine.engine import fit_kernels_to_family
        from ..model.kv_cache import KVCache
        from ..model.blocks import pack, rope_spec, rope_tables
        from ..core.topology import Grid
        from ..model.weights import build_weights

        self.bk, self.shape = bk, shape
        model = shape.model()
        self.model = model
        fit_kernels_to_family(bk, model)     # says so when a family's piece is not fused
        grid = Grid(Layout(ep=shape.experts, tp=1, pp=1), model, 0)
        weights = build_weights(grid, bk, seed, init="device")
        self.lw = weights.layers[0]
        self.w1, self.w2, *self.w3 = self.lw.experts[0]      # w3: SwiGLU's up projection
        xp = bk.xp
        rng = xp.random.default_rng(seed + 1)
        self.x = rng.standard_normal((shape.tokens, shape.d_model),
                                     dtype=np.float32).astype(bk.dtype)       # [T, d]
        self.scale = float(model.head_dim) ** -0.5
        self.dispatcher = Dispatcher(bk, MPI.COMM_SELF, None, model.n_experts, model.top_k,
                                     grid.experts)
        lengths = np.full(shape.seqs, shape.seq_len, dtype=np.int64)
        budget = shape.chunk_tokens or shape.tokens
        self.cache = None
        if budget < shape.tokens:
            self.cache = KVCache(bk, range(1), 0, shape.seqs, shape.seq_len, model.kv_heads,
                                 model.head_dim)
        # Per micro-batch: packed chunks, their rows of x, RoPE tables, and the glue that
        # makes its share of the expert rows (--rows) from its permuted rows (untimed).
        self.micro = []
        for mb in chunked(range(shape.seqs), lengths, budget):
            packed = pack(bk, mb.seqs, mb.lengths, mb.starts)
            rows_of_x = np.concatenate([np.arange(a, a + n) + s * shape.seq_len for s, a, n in
                                        zip(mb.seqs, mb.starts, mb.lengths)])
            routed = mb.n_tokens * model.top_k
            rows = max(1, round(shape.expert_rows * mb.n_tokens / shape.tokens))
            self.micro.append((
                packed, None if budget >= shape.tokens else bk.asarray(rows_of_x),
                rope_tables(bk, packed.positions, rope_spec(model)),
                None if rows == routed else bk.asarray(np.arange(rows) % routed),
                None if rows == routed else bk.asarray(np.arange(routed) % rows)))

    @property
    def micro_batches(self) -> int:
        return len(self.micro)

    def run(self, timer):
        """One step; returns the layer output [T, d] (storage dtype)."""
        outs = [self._micro_batch(timer, *parts) for parts in self.micro]
        return outs[0] if len(outs) == 1 else self.bk.xp.concatenate(outs)

    def _micro_batch(self, timer, packed, rows_of_x, rope, to_expert, from_expert):
        from ..backend.array import F32
        from ..moe.experts import expert_ffn
        from ..model.blocks import apply_rope, causal_attention, qk_norm, rms_norm
        from ..moe.router import route

        bk, lw, model, cache = self.bk, self.lw, self.model, self.cache
        x = self.x if rows_of_x is None else bk.take_rows(self.x, rows_of_x)  # untimed glue
        n, heads, kv_heads, dh = x.shape[0], model.n_heads, model.kv_heads, model.head_dim
        with timer.phase("attn_qkv"):
            a = rms_norm(bk, x, lw.attn_norm, model.norm_eps)
            q = bk.matmul(a, lw.wq).reshape(n, heads, dh)                       # [t, H, Dh]
            k = bk.matmul(a, lw.wk).reshape(n, kv_heads, dh)                    # [t, Hk, Dh]
            v = bk.matmul(a, lw.wv).reshape(n, kv_heads, dh)
            q, k = qk_norm(bk, model.qk_norm, q, k, lw.q_norm, lw.k_norm, model.norm_eps,
                           model.q_width, model.kv_width)
        with timer.phase("attn_rope"):
            q, k = apply_rope(bk, q, *rope), apply_rope(bk, k, *rope)
        with timer.phase("attn_core"):
            if cache is None:
                keys, values = k, v
                k_starts, k_lengths = packed.starts_host, packed.lengths_host
            else:
                cache.write(0, packed, k, v)
                keys, values, k_starts, k_lengths = cache.view(0, packed)
            att = causal_attention(bk, q, packed.starts_host, packed.lengths_host, keys,
                                   values, k_starts, k_lengths, self.scale)      # [t, d]
        with timer.phase("attn_out"):
            h = bk.store(x.astype(F32) + bk.matmul(att, lw.wo).astype(F32))
        with timer.phase("router"):
            b = rms_norm(bk, h, lw.moe_norm, model.norm_eps)
            top_experts, weights = route(bk, b, lw.router, model.top_k,
                                         model.router_renorm)                   # [t, k]
        with timer.phase("permute"):
            plan = self.dispatcher.dispatch_preprocess(top_experts)
            send = self.dispatcher.permute(b, plan)                             # [R, d]
        rows = send if to_expert is None else send[to_expert]
        with timer.phase("experts"):
            out = expert_ffn(bk, rows, self.w1, self.w2, None, *self.w3)        # [rows, d]
        returned = out if from_expert is None else out[from_expert]
        with timer.phase("unpermute"):
            moe = self.dispatcher.combine_postprocess(returned, plan, weights)   # [t, d] f32
        with timer.phase("residual"):
            return bk.store(h.astype(F32) + moe)


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
    phases: dict[str, list[float]] = {p: [] for p in LAYER_PHASES}
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
            for p in LAYER_PHASES:
                phases[p].append(seconds.get(p, 0.0) * 1e3)
    finite = bool(np.isfinite(bk.to_host(out[:4].astype(np.float32))).all())
    flops = layer_flops(shape)
    result = _layer_result(bk, shape, iters, warmup, phases, walls, flops, peak, peak_source)
    result["micro_batches"] = step.micro_batches
    result["output_finite"] = finite
    del step, out
    if bk.on_gpu:
        bk.xp.get_default_memory_pool().free_all_blocks()
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

    n, heads, kv_heads, dh = shape.tokens, shape.heads, shape.model().kv_heads, shape.head_dim
    rng = bk.xp.random.default_rng(seed + 2)
    q, k, v = (rng.standard_normal((n, h, dh), dtype=np.float32).astype(bk.dtype)
               for h in (heads, kv_heads, kv_heads))                   # [T, H | Hk, Dh]
    starts = np.arange(shape.seqs, dtype=np.int64) * shape.seq_len
    lengths = np.full(shape.seqs, shape.seq_len, dtype=np.int64)
    result = {"available": True, "chosen": tile_rows(lengths, heads, bk.kernels.n_sm,
                                                     shape.dtype),
              "flops": layer_flops(shape)["attn_core"], "ms": {}, "tflops": {}}
    outputs = {}
    for rows in TILE_ROWS:
        times = []
        for i in range(warmup + iters):
            timer = bk.timer()
            with timer.phase("attn_core"):
                out = bk.kernels.attention(q, starts, lengths, k, v, starts, lengths,
                                           dh ** -0.5, tile_rows=rows)          # [T, d]
            if i >= warmup:
                times.append(timer.totals()["attn_core"] * 1e3)
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
    per_iter_attention = [sum(phases[p][i] for p in ATTENTION_PHASES) for i in range(iters)]
    phase_stats = {p: stats(phases[p]) for p in LAYER_PHASES}
    total_flops = sum(flops.values())
    flops_out = dict(flops)
    flops_out["attention"] = sum(flops[p] for p in ATTENTION_PHASES)
    flops_out["step"] = total_flops
    tflops, mfu = {}, {}
    for name, ms in list(((p, phase_stats[p]["mean"]) for p in LAYER_PHASES)) + [
            ("attention", float(np.mean(per_iter_attention))),
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
        "attention_ms": stats(per_iter_attention),
        "step_ms": stats(per_iter_step),
        "step_wall_ms": stats(walls),
        "flops": flops_out,
        "tflops": tflops,
        "peak": {"tflops": peak / 1e12, "source": peak_source},
        "mfu": mfu,
        "floor_ms": total_flops / peak * 1e3 if peak else None,
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
        _target("attention vs SDPA", ours["attn_core"]["mean"], peer_ms.get("sdpa"),
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
