"""``spmd-moe bench``: one rank's layer step at paper shapes, phase by phase, against the
device's measured matmul peak and against PyTorch doing the same work (SPEC §7).

Two measurements, both built from the engine's own functions on a real :class:`Backend`:

- **Layer step** (one process): the work one of the 16 ranks of the paper's expert-parallel
  layout does for one layer. Attention over ``seqs`` sequences of ``seq_len`` tokens (RMSNorm,
  Q/K/V projections, RoPE, causal attention, output projection, residual), the router, the
  permutation of the rank's ``T*k`` routed rows by expert, ``rows`` rows through one expert's
  FFN (at paper size every rank sends and receives ~160,000 rows: 16 ranks x 80,000 tokens
  x 2 / 16), then un-permutation with the weighted sum and the residual. The Alltoallv
  between permutation and expert is the transport measurement's business. Per-phase times
  come from CUDA events on the compute stream on a GPU, from the host clock on NumPy.
  With the fused kernels (CuPy, bf16), the attention core is also timed with each tile
  height the kernel has (64 and 128 queries per CTA) on the same inputs, so that one run
  says which to keep.
  When ``import torch`` works, the same shapes are timed in PyTorch in the same run:
  ``scaled_dot_product_attention`` (causal), two plain bf16 GEMMs with and without the GELU,
  and an eager whole step (norms, projections, RoPE, SDPA, router, gather, FFN,
  scatter-add). PyTorch is a peer to measure against, never a dependency.
- **Transport** (``--transport-only``, under ``mpiexec -n P``): the engine's dispatch and
  combine (permute, count exchange, Alltoallv both ways, un-permute and weighted sum) of
  ``seqs x seq_len`` tokens per rank through the chosen transport, against a raw host
  ``Alltoallv`` of the same bytes in the same job; checks that every row came back.

Defaults are the paper's shapes; every size has a flag, so tests run the same code tiny on
NumPy. ``--model DIR`` takes the model's shapes and family from a checkpoint's config.json
(grouped K/V heads, head dim, q/k norms, SwiGLU experts, router renormalisation; random
weights: no tensor is read); the PyTorch peer then runs only for SPEC §1's layer, which is
all it implements. Results go to stdout (rank 0) and, with ``--json``, to a file. Timings are reported,
never asserted.

Notation: B sequences, L tokens per sequence, T = B*L tokens, d width, H heads, Dh = d/H,
F expert hidden width, E experts, k top-k, R = T*k routed rows, P ranks.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..core.errors import ConfigError, collective, say

# SPEC §7, for the report (the measured numbers sit beside them; nothing is asserted).
SPEC_TARGETS = {
    "paper_step_tflop": 60.2,
    "paper_floor_ms_at_790_tflops": 76.0,
    "pytorch_eager_step_ms_measured": 127.0,
    "step_vs_pytorch_eager": {"required": 1.0, "aim": 1.0 / 1.3},
    "attention_vs_sdpa": {"required": 1.4, "aim": 1.1},
    "expert_ffn_vs_two_gemms": {"required": 1.1, "aim": 1.1},
    "step_vs_floor": {"required": None, "aim": 1.0 / 0.8},
    "dispatch_combine_vs_raw_alltoallv": {"required": 1.2, "aim": 1.2},
}
LAYER_PHASES = ("attn_qkv", "attn_rope", "attn_core", "attn_out", "router", "permute",
                "experts", "unpermute", "residual")
ATTENTION_PHASES = ("attn_qkv", "attn_rope", "attn_core", "attn_out")
TRANSPORT_PHASES = ("permute", "count_exchange", "dispatch", "combine", "unpermute")


# --- shapes and FLOPs ------------------------------------------------------------------

@dataclass(frozen=True)
class BenchShape:
    """The sizes of one bench run (paper shapes by default)."""

    seqs: int = 8
    seq_len: int = 10000
    rows: int | None = None          # expert rows; default T*k
    d_model: int = 4096
    d_ff: int = 16384
    heads: int = 32
    experts: int = 16
    top_k: int = 2
    dtype: str = "bfloat16"
    family: object | None = None     # a checkpoint's ModelConfig (--model): its shapes win
    chunk_tokens: int | None = None  # prefill in chunks of this many tokens (engine's way)

    @property
    def tokens(self) -> int:
        return self.seqs * self.seq_len

    @property
    def routed_rows(self) -> int:
        return self.tokens * self.top_k

    @property
    def expert_rows(self) -> int:
        return self.routed_rows if self.rows is None else self.rows

    @property
    def head_dim(self) -> int:
        return self.family.head_dim if self.family is not None else self.d_model // self.heads

    @classmethod
    def for_model(cls, model, seqs: int, seq_len: int, rows: int | None,
                  dtype: str | None = None, chunk_tokens: int | None = None) -> "BenchShape":
        """One rank's layer step of a checkpoint's model (``--model``): its sizes and
        family; ``dtype`` defaults to the checkpoint's."""
        return cls(seqs, seq_len, rows, model.d_model, model.d_ff, model.n_heads,
                   model.n_experts, model.top_k, dtype or model.dtype, family=model,
                   chunk_tokens=chunk_tokens)

    @property
    def spec_layer(self) -> bool:
        """Whether this is SPEC §1's layer (what the PyTorch peer implements)."""
        model = self.model()
        return (model.kv_heads == model.n_heads and model.activation == "gelu"
                and model.qk_norm == "none" and model.q_width == model.d_model)

    def validate(self, layer_step: bool = True) -> "BenchShape":
        """Check the sizes (the attention's only for the layer step), naming the flag."""
        for flag, value in (("--seqs", self.seqs), ("--seq-len", self.seq_len),
                            ("--d-model", self.d_model), ("--d-ff", self.d_ff),
                            ("--heads", self.heads), ("--experts", self.experts),
                            ("--top-k", self.top_k), ("--rows", self.expert_rows),
                            ("--chunk-tokens", self.chunk_tokens or 1)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(flag, f"{value!r} must be a positive integer")
        if layer_step and self.family is None and (self.d_model % self.heads
                                                   or self.head_dim % 2):
            raise ConfigError("--heads", f"d_model={self.d_model} / heads={self.heads} must be "
                                         "a whole, even head dim")
        if self.top_k > self.experts:
            raise ConfigError("--top-k", f"{self.top_k} must be at most --experts="
                                         f"{self.experts}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ConfigError("--dtype", f"{self.dtype!r} is not one of bfloat16, float32")
        return self

    def model(self):
        """The one-layer model of these shapes (a tiny vocabulary: no embedding is timed)."""
        from dataclasses import replace

        from ..core.config import ModelConfig

        if self.family is not None:
            return replace(self.family, vocab_size=128, n_layers=1, dtype=self.dtype,
                           max_seq_len=self.seq_len, tie_word_embeddings=False).validate()
        return ModelConfig(vocab_size=128, d_model=self.d_model, n_heads=self.heads,
                           n_layers=1, n_experts=self.experts, d_ff=self.d_ff,
                           top_k=self.top_k, dtype=self.dtype,
                           max_seq_len=self.seq_len).validate()


def layer_flops(shape: BenchShape) -> dict[str, float]:
    """FLOPs of each layer-step phase (multiply-add = 2; elementwise work not counted).

    The engine's own count (costs.layer_flops), with the projections split into Q/K/V and
    output (``d x H*Dh``: 1/4 of them for SPEC §1's model). Paper shapes: 60.2 TFLOP, as
    SPEC §7 counts them.
    """
    from ..core.costs import layer_flops as rank_layer_flops

    model = shape.model()
    lengths = np.full(shape.seqs, shape.seq_len, dtype=np.int64)
    part = rank_layer_flops(model, shape.tokens, lengths, model.n_heads, shape.expert_rows,
                            model.d_ff, model.kv_heads)
    flops = {phase: 0.0 for phase in LAYER_PHASES}
    flops["attn_out"] = 2.0 * shape.tokens * model.d_model * model.q_width
    flops["attn_qkv"] = part["attention_proj"] - flops["attn_out"]
    flops["attn_core"] = part["attention_core"]
    flops["router"] = part["router"]
    flops["experts"] = part["experts"]
    return flops


def estimate_bytes(shape: BenchShape, on_gpu: bool) -> int:
    """A rough upper bound of the layer step's peak memory (checked before allocating)."""
    item = 2 if shape.dtype == "bfloat16" else 4
    param = item if on_gpu else 4
    model = shape.model()
    t, d, f = shape.tokens, shape.d_model, shape.d_ff
    wide, matrices = max(d, model.q_width), model.expert_matrices
    rows, routed = shape.expert_rows, shape.routed_rows
    weights = (2 * d * model.q_width + 2 * d * model.kv_width + d * shape.experts
               + matrices * d * f) * param
    if shape.chunk_tokens and shape.chunk_tokens < t:
        # One chunk's activations at a time, plus the input [T, d], its output and the
        # KV cache of every position.
        weights += t * d * item * 2 + 2 * t * model.kv_width * item
        t, rows, routed = shape.chunk_tokens, -(-rows * shape.chunk_tokens // t), \
            -(-routed * shape.chunk_tokens // t)
    activations = (t * wide * item * 10        # x, a, q, k, v, att, h, b, out, spare
                   + t * wide * 4 * 5          # float32 temporaries of norms, RoPE, residual
                   + routed * d * item * 3     # permuted rows, returned rows, un-permuted
                   + rows * d * item * 2       # expert input and output
                   + rows * f * (4 * matrices + item))  # float32 hidden(s), activation, stored
    attention = 2 * shape.seq_len * d * 4 + (64 << 20)   # generic path: one sequence's K, V
    return int(weights + activations + attention)


# --- timing ------------------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
            "all": [float(v) for v in arr]}


# --- the layer step ------------------------------------------------------------------------

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
        from ..model.blocks import pack, rope_tables
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
                rope_tables(bk, packed.positions, model.head_dim, model.rope_theta),
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
            _trace_iteration(tracer, timer, bk, began, i, warmup)
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
        "backend": _backend_facts(bk),
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


def _backend_facts(bk) -> dict:
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


# --- the PyTorch peer -----------------------------------------------------------------------

def torch_peer(shape: BenchShape, iters: int, warmup: int, on_gpu: bool, seed: int = 0) -> dict:
    """The same shapes in PyTorch, when it imports: SDPA, the FFN's two GEMMs (with and
    without GELU), and an eager whole step. Each part reports its own failure (say, out of
    memory) without stopping the others."""
    try:
        import torch
        import torch.nn.functional as F
    except Exception as exc:  # ImportError, or a torch that fails to load its libraries
        return {"available": False, "reason": f"import torch failed ({type(exc).__name__}: "
                                              f"{str(exc).splitlines()[0] if str(exc) else ''})"}
    if on_gpu and not torch.cuda.is_available():
        return {"available": False, "reason": "torch has no usable CUDA device"}
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if shape.dtype == "bfloat16" else torch.float32
    result = {"available": True, "torch": torch.__version__, "device": (
        torch.cuda.get_device_name() if on_gpu else "cpu"), "phases_ms": {}, "errors": {}}
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*dims, scale=1.0):
        return (torch.randn(*dims, generator=gen, device=device, dtype=torch.float32)
                * scale).to(dtype)

    def timed(name, fn):
        try:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(iters):
                if on_gpu:
                    start = torch.cuda.Event(enable_timing=True)
                    stop = torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
            result["phases_ms"][name] = stats(times)
        except Exception as exc:  # a peer failure is a reported fact, not a crash
            result["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            if on_gpu:
                torch.cuda.empty_cache()

    b, seq, heads, dh, d = shape.seqs, shape.seq_len, shape.heads, shape.head_dim, shape.d_model
    rows, f = shape.expert_rows, shape.d_ff

    # Each part allocates in its own scope, so its memory is gone before the next starts.
    def attention():
        q, k, v = (randn(b, heads, seq, dh) for _ in range(3))               # [B, H, L, Dh]
        timed("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def ffn():
        x = randn(rows, d)
        w1, w2 = randn(d, f, scale=d ** -0.5), randn(f, d, scale=f ** -0.5)
        hidden = torch.empty(rows, f, device=device, dtype=dtype)
        out = torch.empty(rows, d, device=device, dtype=dtype)
        timed("ffn_gemms", lambda: torch.matmul(torch.matmul(x, w1, out=hidden), w2, out=out))
        timed("ffn_gelu", lambda: torch.matmul(F.gelu(x @ w1), w2))

    def eager_step():
        timed("eager_step", _torch_eager_step(torch, F, shape, randn, device, dtype))

    with torch.no_grad():
        for name, part in (("sdpa", attention), ("ffn", ffn), ("eager_step", eager_step)):
            try:
                part()
            except Exception as exc:   # e.g. out of memory while allocating the inputs
                result["errors"][name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if on_gpu:
                torch.cuda.empty_cache()
    return result


def _torch_eager_step(torch, F, shape: BenchShape, randn, device, dtype):
    """A closure doing the layer step as plain eager PyTorch would: unfused RMSNorm and RoPE,
    cuBLAS projections, SDPA, a float32 top-k router, gather, one expert's FFN and a
    weighted scatter-add (index_add_)."""
    b, seq, heads, dh, d = shape.seqs, shape.seq_len, shape.heads, shape.head_dim, shape.d_model
    t, k_top, rows = shape.tokens, shape.top_k, shape.expert_rows
    routed = shape.routed_rows
    eps = 1e-5
    x = randn(t, d)
    wq, wk, wv, wo = (randn(d, d, scale=d ** -0.5) for _ in range(4))
    wr = randn(d, shape.experts, scale=d ** -0.5)
    w1 = randn(d, shape.d_ff, scale=d ** -0.5)
    w2 = randn(shape.d_ff, d, scale=shape.d_ff ** -0.5)
    g1 = torch.ones(d, device=device, dtype=dtype)
    g2 = torch.ones(d, device=device, dtype=dtype)
    pos = torch.arange(seq, device=device, dtype=torch.float64).repeat(b)           # [T]
    inv_freq = 10000.0 ** (-torch.arange(0, dh, 2, device=device, dtype=torch.float64) / dh)
    ang = pos[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)[:, None, :]                                 # [T, 1, Dh]
    cos, sin = ang.cos().float(), ang.sin().float()
    to_expert = None if rows == routed else torch.arange(rows, device=device) % routed
    from_expert = None if rows == routed else torch.arange(routed, device=device) % rows

    def rms_norm(u, g):
        uf = u.float()
        return (uf * torch.rsqrt(uf.pow(2).mean(-1, keepdim=True) + eps) * g.float()).to(dtype)

    def rope(u):
        uf = u.float()
        half = dh // 2
        rotated = torch.cat([-uf[..., half:], uf[..., :half]], dim=-1)
        return (uf * cos + rotated * sin).to(dtype)

    def step():
        a = rms_norm(x, g1)
        q = rope((a @ wq).view(t, heads, dh))
        k = rope((a @ wk).view(t, heads, dh))
        v = (a @ wv).view(t, heads, dh)
        q, k, v = (u.view(b, seq, heads, dh).transpose(1, 2) for u in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)             # [B,H,L,Dh]
        att = att.transpose(1, 2).reshape(t, d)
        h = (x.float() + (att @ wo).float()).to(dtype)
        bn = rms_norm(h, g2)
        probs = torch.softmax(bn.float() @ wr.float(), dim=-1)                     # [T, E]
        weights, experts = probs.topk(k_top, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        order = torch.argsort(experts.reshape(-1), stable=True)                    # [R]
        token = order // k_top
        send = bn.index_select(0, token)                                           # [R, d]
        expert_in = send if to_expert is None else send[to_expert]
        out = F.gelu(expert_in @ w1) @ w2
        back = out if from_expert is None else out[from_expert]
        moe = torch.zeros(t, d, device=device, dtype=torch.float32)
        moe.index_add_(0, token, back.float() * weights.reshape(-1)[order, None])
        return (h.float() + moe).to(dtype)

    return step


# --- dispatch + combine against a raw Alltoallv ----------------------------------------------

def _trace_iteration(tracer, timer, bk, began: float, i: int, warmup: int) -> None:
    """Iteration ``i``'s phases into ``tracer`` after its ``totals()`` (device synced), and
    the iteration itself as a host span."""
    bk.synchronize()
    tracer.collect(timer, bk)
    label = f"warm-up {i + 1}" if i < warmup else f"iteration {i - warmup + 1}"
    tracer.host_span(label, began, tracer.now())


def run_transport(comm, bk, transport, shape: BenchShape, iters: int = 3, warmup: int = 1,
                  seed: int = 0, progress=None, tracer=None) -> dict | None:
    """Dispatch and combine of ``shape.tokens`` tokens per rank across ``comm`` (each rank
    owning ``E/P`` experts), timed against a raw host Alltoallv of the same rows both ways.
    Collective; the result on rank 0, None elsewhere."""
    from mpi4py import MPI

    from ..moe.dispatcher import AlltoallDispatcher
    from ..core.topology import block_range

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
    phases: dict[str, list[float]] = {p: [] for p in TRANSPORT_PHASES}
    ours, raw = [], []
    moe = None
    for i in range(warmup + iters):
        timer = bk.timer()
        bk.synchronize()
        comm.Barrier()
        if tracer is not None:
            tracer.arm(timer, bk)
        t0 = time.perf_counter()
        with timer.phase("permute"):
            plan = dispatcher.dispatch_preprocess(top_experts)
            send = dispatcher.permute(x, plan)                                   # [R, d]
        with timer.phase("count_exchange"):
            dispatcher.exchange_counts(plan)
        with timer.phase("dispatch"):
            received = dispatcher.token_dispatch(send, plan)                    # [Rr, d]
        with timer.phase("permute"):
            grouped = dispatcher.dispatch_postprocess(received, plan)
        with timer.phase("unpermute"):
            back = dispatcher.combine_preprocess(grouped, plan)
        with timer.phase("combine"):
            returned = dispatcher.token_combine(back, plan)                     # [R, d]
        with timer.phase("unpermute"):
            moe = dispatcher.combine_postprocess(returned, plan, weights)      # [T, d] f32
        bk.synchronize()
        elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        seconds = timer.totals()
        if tracer is not None:
            _trace_iteration(tracer, timer, bk, t0, i, warmup)
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
        "backend": _backend_facts(bk),
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


# --- printing --------------------------------------------------------------------------

def format_layer(result: dict) -> str:
    shape, backend = result["shape"], result["backend"]
    lines = [
        f"spmd-moe bench: one rank's layer step, {shape['seqs']} x {shape['seq_len']} tokens, "
        f"d={shape['d_model']} H={shape['heads']} F={shape['d_ff']} E={shape['experts']} "
        f"k={shape['top_k']}, {shape['expert_rows']} expert rows, {shape['dtype']}"
        + (f"; chunks of {shape['chunk_tokens']} tokens: {result['micro_batches']} "
           "micro-batches, attention through a KV cache" if shape.get("chunk_tokens") else ""),
        f"  backend {backend['name']} ({backend['device']}); kernels: "
        f"{'on' if backend['kernels'] else 'off'} ({backend['kernels_reason']})",
        f"  peak {result['peak']['tflops']:.4g} TFLOP/s ({result['peak']['source']}); "
        f"step {result['flops']['step'] / 1e12:.4g} TFLOP, floor "
        f"{result['floor_ms']:.4g} ms" if result["floor_ms"] else "  peak unknown",
        f"  {'phase':<12}{'mean ms':>11}{'min ms':>11}{'GFLOP':>12}{'TFLOP/s':>10}{'MFU':>8}",
    ]
    rows = [(p, result["phases_ms"][p]) for p in LAYER_PHASES] + [
        ("attention", result["attention_ms"]), ("step", result["step_ms"])]
    for name, st in rows:
        fl = result["flops"].get(name, 0.0)
        tf = result["tflops"].get(name)
        mfu = result["mfu"].get(name)
        lines.append(f"  {name:<12}{st['mean']:>11.3f}{st['min']:>11.3f}{fl / 1e9:>12.5g}"
                     + (f"{tf:>10.4g}{mfu * 100:>7.1f}%" if tf is not None else ""))
    lines.append(f"  step wall (events around the step) {result['step_wall_ms']['mean']:.3f} ms")
    tiles = result.get("attention_tiles", {})
    if tiles.get("available"):
        lines.append("  attention core by tile height (same inputs): " + ", ".join(
            f"{rows} queries {st['mean']:.3f} ms ({tiles['tflops'][rows]:.4g} TFLOP/s)"
            for rows, st in tiles["ms"].items())
            + f"; the schedule picks {tiles['chosen']}; outputs "
            + ("identical" if tiles["outputs_identical"]
               else f"differ (relative {tiles['outputs_max_rel_diff']:.2g})"))
    elif tiles:
        lines.append(f"  attention tile heights: not timed ({tiles['reason']})")
    peer = result.get("peer", {})
    if peer.get("available"):
        lines.append(f"  PyTorch {peer['torch']} on {peer['device']}:")
        for name, st in peer["phases_ms"].items():
            lines.append(f"    {name:<12}{st['mean']:>11.3f} ms")
        for name, err in peer.get("errors", {}).items():
            lines.append(f"    {name:<12} failed: {err}")
    else:
        lines.append(f"  PyTorch peer: not run ({peer.get('reason', 'n/a')})")
    lines.append("  SPEC §7 targets (ratio ours/reference; lower is better):")
    for row in result["targets"]:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "  n/a"
        req = f"<= {row['required']:.2f}x" if row["required"] is not None else "  -   "
        lines.append(f"    {row['name']:<36}{ratio:>8}  required {req}  aim <= "
                     f"{row['aim']:.2f}x  {row['status']}")
    return "\n".join(lines)


def format_transport(result: dict) -> str:
    shape = result["shape"]
    lines = [
        f"spmd-moe bench --transport-only: {result['world_size']} ranks, transport "
        f"{result['transport']['name']} ({result['transport']['reason']}), backend "
        f"{result['backend']['name']}",
        f"  {shape['tokens_per_rank']} tokens x k={shape['top_k']} per rank, d="
        f"{shape['d_model']} {shape['dtype']}, E={shape['experts']}; sent per rank "
        f"{result['bytes_sent_per_rank']['dispatch']['mean'] / 1e6:.1f} MB each way",
        f"  dispatch+combine {result['dispatch_combine_ms']['mean']:.3f} ms, raw host "
        f"Alltoallv x2 {result['raw_alltoallv_ms']['mean']:.3f} ms: ratio "
        + (f"{result['ratio']:.2f}x" if result["ratio"] else "n/a")
        + f" (required <= {result['target']['required']}x: {result['target']['status']})",
        f"  rows came back intact: {'yes' if result['roundtrip_ok'] else 'NO'} "
        f"(max abs error {result['roundtrip_max_abs_error']:.3g})",
        f"  {'phase (max over ranks)':<24}{'mean ms':>11}",
    ]
    for name, st in result["phases_max_ms"].items():
        lines.append(f"  {name:<24}{st['mean']:>11.3f}")
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------

MODEL_SIZE_FLAGS = (("--d-model", "d_model"), ("--d-ff", "d_ff"), ("--heads", "heads"),
                    ("--experts", "experts"), ("--top-k", "top_k"))


def shape_from_args(args) -> BenchShape:
    """The BenchShape of the command line: flags over the paper's defaults, or (``--model``)
    a checkpoint's sizes, which those flags may not change."""
    if args.model:
        from ..model.checkpoint import read_hf_config
        from ..model.families import model_config_from_hf

        for flag, name in MODEL_SIZE_FLAGS:
            if getattr(args, name) is not None:
                raise ConfigError(flag, "fixed by --model's config.json")
        dtype = None
        if args.dtype is not None:
            from ..core.config import DTYPE_ALIASES

            dtype = DTYPE_ALIASES.get(str(args.dtype).lower(), args.dtype)
        model = model_config_from_hf(read_hf_config(args.model),
                                     dtype if dtype in ("bfloat16", "float32") else None)
        return BenchShape.for_model(model, args.seqs, args.seq_len, args.rows,
                                    dtype or model.dtype, args.chunk_tokens)
    defaults = BenchShape()
    sizes = {name: getattr(args, name) if getattr(args, name) is not None
             else getattr(defaults, name) for _, name in MODEL_SIZE_FLAGS}
    return BenchShape(args.seqs, args.seq_len, args.rows, dtype=args.dtype or defaults.dtype,
                      chunk_tokens=args.chunk_tokens, **sizes)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "bench", help="one rank's layer step at paper shapes per phase, MFU and the PyTorch "
                      "peer; or --transport-only under mpiexec")
    sizes = parser.add_argument_group("shapes (default: the paper's, one rank of 16)")
    defaults = BenchShape()
    sizes.add_argument("--model", metavar="DIR",
                       help="take the model's sizes and family from DIR/config.json (a "
                            "Hugging Face checkpoint; no weights are read)")
    sizes.add_argument("--seqs", type=int, default=defaults.seqs, help="sequences (default 8)")
    sizes.add_argument("--seq-len", type=int, default=defaults.seq_len,
                       help="tokens per sequence (default 10000)")
    sizes.add_argument("--rows", type=int, help="rows through the expert (default: "
                                                "seqs*seq-len*top-k)")
    for flag, name in MODEL_SIZE_FLAGS:
        sizes.add_argument(flag, type=int, help=f"default {getattr(defaults, name)}, or the "
                                                "model's under --model")
    sizes.add_argument("--dtype", help="bfloat16 (default, or the model's) or float32")
    sizes.add_argument("--chunk-tokens", type=int, metavar="N",
                       help="layer step: the same work as the engine's chunked prefill, in "
                            "micro-batches of N tokens reading a KV cache (default: one "
                            "micro-batch of whole sequences)")
    run = parser.add_argument_group("execution and output")
    run.add_argument("--iters", type=int, default=3, help="timed iterations (default 3)")
    run.add_argument("--warmup", type=int, default=1, help="untimed iterations (default 1)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--backend", default="auto", help="auto | cupy | numpy")
    run.add_argument("--peer", choices=("auto", "none"), default="auto",
                     help="time PyTorch on the same shapes when it imports (default auto)")
    run.add_argument("--transport-only", action="store_true",
                     help="time dispatch+combine against a raw host Alltoallv (run under "
                          "mpiexec; tokens per rank = seqs*seq-len)")
    run.add_argument("--transport", default="auto", help="auto | mpi-cuda | mpi-host | nccl")
    run.add_argument("--memory-limit", type=float, metavar="GIB",
                     help="memory for the pre-allocation check (default: free memory)")
    run.add_argument("--json", help="write the result as JSON (rank 0)")
    run.add_argument("--trace", metavar="FILE.json",
                     help="a Chrome trace-event timeline of the timed phases (Perfetto, "
                          "chrome://tracing)")
    run.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from mpi4py import MPI

    from ..backend import kernels  # noqa: F401  (registers the fused kernels with the backend)
    from ..backend.array import Backend, choose_backend
    from .options import check_execution_arguments, gather_trace, start_trace
    from ..core.files import check_output_paths, text_writer, write_files

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    def checked() -> BenchShape:
        shape = shape_from_args(args).validate(layer_step=not args.transport_only)
        check_execution_arguments(args)
        if args.transport_only and shape.experts % comm.Get_size():
            raise ConfigError("--experts", f"{shape.experts} experts must divide among "
                                           f"{comm.Get_size()} ranks")
        if not args.transport_only and comm.Get_size() > 1:
            raise ConfigError("bench", "the layer step is one rank's work: run it without "
                                       "mpiexec, or add --transport-only")
        if rank == 0:
            check_output_paths((args.json, "--json"), (args.trace, "--trace"))
        return shape

    shape = collective(comm, checked)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        choice = collective(comm, choose_backend, args.backend, node.Get_rank(),
                            node.Get_size())
    finally:
        node.Free()
    bk = Backend(choice, shape.dtype)

    def progress(text: str) -> None:
        if rank == 0 and not args.quiet:
            say(f"spmd-moe bench: {text}")

    limit = int(args.memory_limit * 2 ** 30) if args.memory_limit else None
    tracer = start_trace(comm, args)
    if args.transport_only:
        transport = _open_transport(comm, bk, args.transport)
        if tracer is not None:
            tracer.deployment(f"rank {rank}: dispatch + combine")
        try:
            result = run_transport(comm, bk, transport, shape, args.iters, args.warmup,
                                   args.seed, progress, tracer)
        finally:
            transport.free()
        text = format_transport(result) if result else ""
    else:
        if tracer is not None:
            tracer.deployment("rank 0: layer step")
        result = run_layer_step(bk, shape, args.iters, args.warmup, args.seed, args.peer,
                                limit, progress, tracer)
        text = format_layer(result)
    trace = gather_trace(comm, args, tracer)

    def write_outputs() -> None:
        if rank != 0:
            return
        files = []
        if args.json:
            files.append((args.json, "--json",
                          text_writer(json.dumps(result, indent=2) + "\n")))
        if args.trace:
            files.append((args.trace, "--trace", text_writer(trace)))
        write_files(files)

    if args.json or args.trace:
        collective(comm, write_outputs)
    if rank == 0:
        print(text, flush=True)
    return 0


def _open_transport(comm, bk, requested: str):
    from ..parallel.gpu_transport import make_transport
    from ..parallel.transport import choose_transport, mpi_library

    nccl = False
    if bk.on_gpu:
        try:
            from cupy.cuda import nccl as cupy_nccl
            nccl = bool(getattr(cupy_nccl, "available", True))
        except Exception:
            nccl = False
    choice = collective(comm, choose_transport, requested, bk.name, mpi_library(), nccl)
    return collective(comm, make_transport, choice, bk, comm)
