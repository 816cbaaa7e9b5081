"""What a rank must compute, hold and send: FLOPs, memory and bytes per layer (SPEC §4 plan).

Pure arithmetic over a :class:`Grid` and the batch's sequence lengths; no MPI, no device.
Routing is assumed balanced (every expert gets ``T*k/E`` rows of a stage's ``T`` tokens):
that is what the paper's numbers assume, and a real run reports its actual expert load.

Notation: T tokens, b sequences, d width, F hidden width, E experts, k top-k, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chunks import Schedule, prefill_schedule
from .config import ModelConfig, RunConfig
from .kv_cache import KVCache
from .overlap import overlap_enabled
from .topology import Grid

GIB = 1 << 30


@dataclass
class RankCost:
    """One rank's work for one forward pass (prefill) of the batch."""

    rank: int
    stage: int
    group_rank: int
    layers: range
    experts: range
    sequences: range
    tokens: int                  # real tokens whose attention this rank runs
    routed_rows: float           # rows its experts process per layer (balanced routing)
    weight_bytes: int
    activation_bytes: int
    kv_bytes: int
    flops: dict[str, float]      # per forward pass, by part
    send_bytes_per_layer: dict[str, float]
    schedule: Schedule | None = None   # the rank's prefill micro-batches

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.kv_bytes

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


def attention_core_flops(lengths: np.ndarray, width: int,
                         starts: np.ndarray | None = None) -> float:
    """Causal QK^T and PV over sequences of ``lengths`` real tokens, ``width`` = h*Dh; or,
    with ``starts``, over chunks whose queries also see their sequence's ``start`` earlier
    keys (query r of a chunk attends to ``start + r + 1`` keys)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    earlier = 0.0 if starts is None else 2.0 * lengths * np.asarray(starts, dtype=np.float64)
    return float(2.0 * width * (lengths * (lengths + 1) + earlier).sum())


def layer_flops(model: ModelConfig, tokens: int, lengths: np.ndarray, heads: int,
                routed_rows: float, ff_width: int,
                starts: np.ndarray | None = None) -> dict[str, float]:
    """FLOPs of one layer on one rank (multiply-add = 2); ``starts``: chunks' first
    positions (attention_core_flops)."""
    d, dh = model.d_model, model.head_dim
    width = heads * dh
    return {
        "attention_proj": 2.0 * tokens * d * 4 * width,
        "attention_core": attention_core_flops(lengths, width, starts),
        "router": 2.0 * tokens * d * model.n_experts,
        "experts": 2.0 * routed_rows * 2 * d * ff_width,
    }


def rank_cost(config: RunConfig, grid: Grid, lengths: np.ndarray, backend: str = "cupy",
              new_tokens: int = 0) -> RankCost:
    """Costs of ``grid``'s rank for a batch whose sequences have ``lengths`` real tokens."""
    model, layout = config.model, grid.layout
    d, dh, e, k = model.d_model, model.head_dim, model.n_experts, model.top_k
    item = 2 if model.dtype == "bfloat16" else 4
    param_item = item if backend == "cupy" else 4   # NumPy keeps weights as float32
    lengths = np.asarray(lengths, dtype=np.int64)
    seqs = grid.sequences(len(lengths))
    my_lengths = lengths[seqs.start:seqs.stop]
    tokens = int(my_lengths.sum())
    heads, ff = len(grid.heads), len(grid.ff_columns)
    width = heads * dh
    n_layers = len(grid.layers)
    stage_tokens = int(lengths.sum())          # a stage processes the whole batch
    if layout.tp > 1:
        routed = tokens * k                    # every rank runs every row on its F slice
    else:
        routed = stage_tokens * k / layout.ep  # balanced: E/ep experts of E get T*k*(1/ep)

    per_layer = layer_flops(model, tokens, my_lengths, heads, routed, ff)
    flops = {part: value * n_layers for part, value in per_layer.items()}
    b_last = len(my_lengths) if grid.is_last_stage and grid.writes_outputs else 0
    flops["lm_head"] = 2.0 * b_last * d * model.vocab_size

    weights = n_layers * (4 * d * width + d * e + 2 * d) * param_item
    weights += n_layers * len(grid.experts) * 2 * d * ff * param_item
    if grid.is_first_stage:
        weights += model.vocab_size * d * item
    if grid.is_last_stage:
        weights += (d * model.vocab_size + d) * param_item

    schedule = prefill_schedule(grid, config.workload, lengths, backend)
    activations = micro_batch_bytes(config, grid, schedule, backend)
    activations += b_last * model.vocab_size * 4          # the rank's logits, float32
    kv = 0
    if new_tokens or schedule.splits_sequences:
        # engine.Engine.new_cache: the longest prompt (plus the tokens to generate) for
        # each of the rank's sequences, every layer of its stage.
        capacity = int(lengths.max()) + new_tokens
        kv = KVCache.nbytes(n_layers, len(my_lengths), capacity, heads, dh, item)

    row = d * item
    if layout.tp > 1:
        allreduce = 2 * (layout.tp - 1) / layout.tp
        # Float32 partial sums: attention output [T, d], expert outputs per routed row
        # [T*k, d] (reduced before the weighted sum, see dispatcher.AllreduceDispatcher).
        send = {"attn_allreduce": tokens * d * 4 * allreduce,
                "combine": tokens * k * d * 4 * allreduce}
    else:
        off_rank = (layout.ep - 1) / layout.ep
        send = {"dispatch": tokens * k * off_rank * row,
                "combine": routed * off_rank * row}
    if not grid.is_last_stage:
        send["stage_send"] = tokens * row / n_layers
    return RankCost(grid.rank, grid.stage, grid.group_rank, grid.layers, grid.experts, seqs,
                    tokens, routed, int(weights), int(activations), int(kv), flops, send,
                    schedule)


def micro_batch_bytes(config: RunConfig, grid: Grid, schedule: Schedule,
                     backend: str = "cupy") -> int:
    """Activation bytes of the micro-batches ``grid``'s rank holds at once: its largest
    micro-batch's tensors (bounded by the chunk budget, not the batch), twice when two are
    in flight (overlap), assuming balanced routing of the stage's largest micro-batch."""
    model, layout = config.model, grid.layout
    d, dh, e, k = model.d_model, model.head_dim, model.n_experts, model.top_k
    item = 2 if model.dtype == "bfloat16" else 4
    ff = len(grid.ff_columns)
    mb_tokens = schedule.largest_tokens
    if layout.tp > 1:
        mb_rows_in = mb_tokens * k                          # every row, on an F slice
        rows_per_expert = mb_rows_in / e
    else:
        mb_rows_in = max(schedule.stage_tokens, default=0) * k / layout.ep
        rows_per_expert = mb_rows_in / max(1, len(grid.experts))
    mb_rows_out = mb_tokens * k
    one = (mb_tokens * d * item * 8                       # x, a, q, k, v, att, h, b
           + mb_tokens * d * 4 * 2                        # float32 attention partial, moe
           + mb_tokens * d * 4 * 5                        # float32 temporaries (norm, RoPE)
           + mb_tokens * dh * 4 * 2                       # RoPE tables
           + mb_rows_out * d * item * 3                   # send, returned, un-permuted
           + mb_rows_in * d * item * 3                    # received, grouped, expert out
           + rows_per_expert * ff * (4 + item))           # one expert's hidden layer
    in_flight = 2 if overlap_enabled(config.workload.overlap, schedule.count, layout.pp,
                                     layout.group, backend) else 1
    activations = in_flight * one
    if backend != "cupy":
        activations += 64 << 20                           # attention score blocks
    return int(activations)


def plan_costs(config: RunConfig, layout, lengths: np.ndarray, backend: str = "cupy",
               new_tokens: int = 0) -> list[RankCost]:
    return [rank_cost(config, Grid(layout, config.model, r), lengths, backend, new_tokens)
            for r in range(layout.world_size)]


def decode_step_bytes(config: RunConfig, grid: Grid, context: int) -> dict[str, float]:
    """Device bytes one rank must read for one decode step of its sequences, each with a
    ``context``-token KV cache: its stage's KV cache, its attention weights, its experts'
    weights (all assumed hit: every expert gets rows from a batch of any size), the router
    and, on the last stage, the LM head. The memory-bandwidth floor is this over HBM speed.
    """
    model = config.model
    item = 2 if model.dtype == "bfloat16" else 4
    d, width = model.d_model, len(grid.heads) * model.head_dim
    n_layers = len(grid.layers)
    seqs = len(grid.sequences(config.workload.batch_size))
    out = {
        "kv_cache": 2.0 * n_layers * seqs * context * width * item,
        "attention_weights": n_layers * 4.0 * d * width * item,
        "expert_weights": n_layers * len(grid.experts) * 2.0 * d * len(grid.ff_columns) * item,
        "router": n_layers * float(d * model.n_experts * item),
    }
    if grid.is_last_stage:
        out["lm_head"] = float(d * model.vocab_size * item)
    return out
