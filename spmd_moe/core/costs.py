"""What a rank must compute, hold and send: FLOPs, memory and bytes per layer (SPEC §4 plan).

Pure arithmetic over a :class:`Grid` and the batch's sequence lengths; no MPI, no device.
Routing is assumed balanced (every expert gets ``T*k/E`` rows of a stage's ``T`` tokens):
that is what the paper's numbers assume, and a real run reports its actual expert load.

Notation: T tokens, b sequences, d width, F hidden width, E experts, k top-k, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chunks import ScheduleSize, overlap_enabled, schedule_size
from .config import ModelConfig, RunConfig
from .topology import Grid

GIB = 1 << 30



def kv_cache_bytes(n_layers: int, n_seqs: int, capacity: int, heads: int, head_dim: int,
                   itemsize: int) -> int:
    """What kv_cache.KVCache's constructor allocates: keys and values of ``n_seqs``
    sequences of ``capacity`` positions, ``heads`` x ``head_dim`` each, per layer."""
    return 2 * n_layers * n_seqs * capacity * heads * head_dim * itemsize


def latent_cache_bytes(n_layers: int, n_seqs: int, capacity: int, width: int,
                       itemsize: int) -> int:
    """What kv_cache.LatentCache's constructor allocates: ``width`` (MLA's kv_lora_rank +
    qk_rope_head_dim) numbers per position of ``n_seqs`` sequences of ``capacity``, per
    layer."""
    return n_layers * n_seqs * capacity * width * itemsize


def cache_bytes(model: ModelConfig, n_layers: int, n_seqs: int, capacity: int,
                kv_heads: int, itemsize: int) -> int:
    """The cache the family chooses (engine.Engine.new_cache): MLA's latent cache, or keys
    and values of ``kv_heads`` heads."""
    if model.attention == "mla":
        return latent_cache_bytes(n_layers, n_seqs, capacity, model.cache_width, itemsize)
    return kv_cache_bytes(n_layers, n_seqs, capacity, kv_heads, model.head_dim, itemsize)


def attention_params(model: ModelConfig, heads: int, kv_heads: int) -> tuple[int, int]:
    """Elements of one layer's attention on a rank with ``heads`` query heads and
    ``kv_heads`` K/V heads: (in the weights' dtype, in float32: the q/k/v biases). MLA's
    latent projections and norms are whole on every rank, its per-head ones sliced."""
    d, dh, dv = model.d_model, model.head_dim, model.v_dim
    if model.attention == "mla":
        rank, latent = model.q_lora_rank, model.kv_lora_rank
        query = (d * rank + rank + rank * heads * dh) if rank else d * heads * dh
        return (query + d * (latent + model.rope_width) + latent
                + latent * heads * (model.nope_dim + dv) + heads * dv * d), 0
    width, kv_width = heads * dh, kv_heads * dh
    qk = {"none": 0, "head": 2 * dh, "full": width + kv_width}[model.qk_norm]
    biases = width + 2 * kv_width if model.qkv_bias else 0
    return d * width + 2 * d * kv_width + heads * dv * d + qk, biases


def mlp_params(model: ModelConfig, layer: int, experts: int, ff: int, shared_ff: int,
               dense_ff: int) -> tuple[int, int]:
    """Elements of one layer's MLP half on a rank: (in the weights' dtype, in float32: the
    router's selection bias). A dense layer: its SwiGLU MLP (``dense_ff`` columns); a MoE
    layer: router, ``experts`` experts of ``ff`` columns, the shared expert (and gate)."""
    d = model.d_model
    if model.is_dense(layer):
        return 3 * d * dense_ff, 0
    shared = 3 * d * shared_ff + (d if model.shared_gate else 0)
    return (d * model.n_experts + experts * model.expert_matrices * d * ff + shared,
            model.n_experts if model.router_bias else 0)

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
    schedule: ScheduleSize | None = None   # the rank's prefill micro-batches, in size

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
                routed_rows: float, ff_width: int, kv_heads: int | None = None,
                starts: np.ndarray | None = None, shared_width: int | None = None,
                dense_width: int | None = None) -> dict[str, float]:
    """FLOPs of one layer on one rank (multiply-add = 2) with ``heads`` query heads and
    ``kv_heads`` key/value heads (default: as many) of the model's head dim: Q and O
    projections ``d x h*Dh``, K and V ``d x hk*Dh`` (MLA: its low-rank projections, and the
    expansion of every key it attends to); two (GELU) or three (SwiGLU) expert matrices of
    ``d x ff_width``, plus a shared expert of ``shared_width`` on every token (default the
    model's; TP: the rank's slice). With ``dense_width`` the layer is dense: that SwiGLU
    MLP instead of router and experts. ``starts``: chunks' first positions
    (attention_core_flops)."""
    d, dh, dv = model.d_model, model.head_dim, model.v_dim
    width = heads * dh
    kv_width = (heads if kv_heads is None else kv_heads) * dh
    if model.attention == "mla":
        params, _ = attention_params(model, heads, 1)
        keys = tokens + (float(np.sum(starts)) if starts is not None else 0.0)
        expand = model.kv_lora_rank * heads * (model.nope_dim + dv)
        proj = 2.0 * tokens * (params - expand - model.q_lora_rank - model.kv_lora_rank) \
            + 2.0 * keys * expand
    else:
        proj = 2.0 * tokens * d * (width + 2 * kv_width + heads * dv)
    out = {
        "attention_proj": proj,
        # QK^T over Dh and PV over Dv: the mean width counts both.
        "attention_core": attention_core_flops(lengths, heads * (dh + dv) / 2, starts),
    }
    if dense_width is not None:
        out["experts"] = 2.0 * tokens * 3 * d * dense_width
        return out
    shared = model.d_shared if shared_width is None else shared_width
    out["router"] = 2.0 * tokens * d * model.n_experts
    out["experts"] = 2.0 * routed_rows * model.expert_matrices * d * ff_width
    if shared:
        out["shared_experts"] = 2.0 * tokens * 3 * d * shared
    return out


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
    heads, kv_heads, ff = len(grid.heads), len(grid.kv_heads), len(grid.ff_columns)
    width, kv_width = heads * dh, kv_heads * dh
    n_layers = len(grid.layers)
    stage_tokens = int(lengths.sum())          # a stage processes the whole batch
    if layout.tp > 1:
        routed = tokens * k                    # every rank runs every row on its F slice
    else:
        routed = stage_tokens * k / layout.ep  # balanced: E/ep experts of E get T*k*(1/ep)

    shared_ff, dense_ff = len(grid.tp_slice(model.d_shared)), len(grid.tp_slice(model.d_ff_dense))
    flops: dict[str, float] = {}
    weights = 0
    for layer in grid.layers:
        dense = model.is_dense(layer)
        per_layer = layer_flops(model, tokens, my_lengths, heads, 0.0 if dense else routed, ff,
                                kv_heads, shared_width=shared_ff,
                                dense_width=dense_ff if dense else None)
        for part, value in per_layer.items():
            flops[part] = flops.get(part, 0.0) + value
        stored, wide = attention_params(model, heads, kv_heads)
        mlp, selection = mlp_params(model, layer, len(grid.experts), ff, shared_ff, dense_ff)
        weights += (stored + mlp + 2 * d) * param_item + (wide + selection) * 4
    b_last = len(my_lengths) if grid.is_last_stage and grid.writes_outputs else 0
    flops["lm_head"] = 2.0 * b_last * d * model.vocab_size
    if grid.is_first_stage:
        weights += model.vocab_size * d * item
    if grid.is_last_stage:
        weights += (d * model.vocab_size + d) * param_item

    schedule = schedule_size(grid, config.workload, lengths, backend)
    activations = micro_batch_bytes(config, grid, schedule, backend,
                                    int(lengths.max(initial=0)))
    activations += b_last * model.vocab_size * 4          # the rank's logits, float32
    kv = 0
    if new_tokens or schedule.splits_sequences:
        # engine.Engine.new_cache: the longest prompt (plus the tokens to generate) for
        # each of the rank's sequences, every layer of its stage.
        capacity = int(lengths.max()) + new_tokens
        kv = cache_bytes(model, n_layers, len(my_lengths), capacity, kv_heads, item)

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


def micro_batch_bytes(config: RunConfig, grid: Grid, schedule: ScheduleSize,
                     backend: str = "cupy", longest: int = 0) -> int:
    """Activation bytes of the micro-batches ``grid``'s rank holds at once: its largest
    micro-batch's tensors (bounded by the chunk budget, not the batch), twice when two are
    in flight (overlap), assuming balanced routing of the stage's largest micro-batch.
    ``longest``: the longest prompt (MLA expands a chunk's earlier keys too)."""
    model, layout = config.model, grid.layout
    d, dh, e, k = model.d_model, model.head_dim, model.n_experts, model.top_k
    item = 2 if model.dtype == "bfloat16" else 4
    ff = len(grid.ff_columns)
    heads = len(grid.heads)
    wide = max(d, heads * dh, heads * model.v_dim)      # q and att are h*Dh (h*Dv) wide
    mb_tokens = schedule.largest_tokens
    if layout.tp > 1:
        mb_rows_in = mb_tokens * k                          # every row, on an F slice
        rows_per_expert = mb_rows_in / e
    else:
        mb_rows_in = schedule.largest_stage_tokens * k / layout.ep
        rows_per_expert = mb_rows_in / max(1, len(grid.experts))
    mb_rows_out = mb_tokens * k
    one = (mb_tokens * wide * item * 8                    # x, a, q, k, v, att, h, b
           + mb_tokens * d * 4 * 2                        # float32 attention partial, moe
           + mb_tokens * wide * 4 * 5                     # float32 temporaries (norm, RoPE)
           + mb_tokens * dh * 4 * 2                       # RoPE tables
           + mb_rows_out * d * item * 3                   # send, returned, un-permuted
           + mb_rows_in * d * item * 3                    # received, grouped, expert out
           + rows_per_expert * ff * (4 * (model.expert_matrices - 1) + item)
           # ^ one expert's hidden layer: float32 accumulator(s) (SwiGLU: gate and up), stored
           + mb_tokens * max(len(grid.tp_slice(model.d_shared)),
                             len(grid.tp_slice(model.d_ff_dense))) * (8 + item)
           # ^ a shared expert's or a dense MLP's hidden layer, the same way
           + mla_expansion_bytes(model, heads, schedule, item, longest))
    in_flight = 2 if overlap_enabled(config.workload.overlap, schedule.count, layout.pp,
                                     layout.group, backend) else 1
    activations = in_flight * one
    if backend != "cupy":
        activations += 64 << 20                           # attention score blocks
    return int(activations)


def mla_expansion_bytes(model: ModelConfig, heads: int, schedule: ScheduleSize,
                        item: int, longest: int) -> int:
    """MLA's prefill expands every key a micro-batch attends to into its heads' keys and
    values (mla.expanded: the product [Tk, h, N+Dv], keys [Tk, h, N+R], values [Tk, h, Dv]);
    a chunk's keys include its sequence's earlier chunks (at most the longest prompt)."""
    if model.attention != "mla":
        return 0
    keys = schedule.largest_tokens + (longest if schedule.splits_sequences else 0)
    per_key = heads * (2 * model.nope_dim + 2 * model.v_dim + model.rope_width)
    return int(keys * per_key * item)


def checkpoint_share_bytes(model: ModelConfig, grid: Grid) -> int:
    """Bytes of ``grid``'s share of an FP8 checkpoint as DeepSeek ships it (what the rank
    reads before dequantising): attention and MLP matrices in float8 (one byte) plus a
    float32 scale per ``fp8_block``; norms, router, embedding and LM head in bfloat16; the
    router's selection bias in float32. (A checkpoint without FP8: its dtype throughout.)"""
    item = 2 if model.fp8_block is not None or model.dtype == "bfloat16" else 4
    quantised = 1 + 4 / (model.fp8_block[0] * model.fp8_block[1]) if model.fp8_block \
        else item
    d, heads, kv_heads = model.d_model, len(grid.heads), len(grid.kv_heads)
    ff, shared, dense = (len(grid.tp_slice(w)) for w in (model.d_ff, model.d_shared,
                                                         model.d_ff_dense))
    total = 0.0
    for layer in grid.layers:
        stored, wide = attention_params(model, heads, kv_heads)
        vectors = (model.q_lora_rank + model.kv_lora_rank) if model.attention == "mla" else 0
        mlp, selection = mlp_params(model, layer, len(grid.experts), ff, shared, dense)
        router = 0 if model.is_dense(layer) else d * model.n_experts
        total += (stored - vectors + mlp - router) * quantised
        total += (vectors + router + 2 * d) * item + (wide + selection) * 4
    if grid.is_first_stage:
        total += model.vocab_size * d * item
    if grid.is_last_stage:
        total += (d * model.vocab_size + d) * item
    return int(total)


def parameter_counts(model: ModelConfig) -> tuple[int, int]:
    """(all parameters, those one token uses): embedding, LM head (unless tied), per layer
    attention and norms, then a dense MLP, or router, E experts (top-k of them for the
    active count) and the shared expert."""
    d = model.d_model
    attention = sum(attention_params(model, model.n_heads, model.kv_heads)) + 2 * d
    embeddings = model.vocab_size * d * (1 if model.tie_word_embeddings else 2) + d
    total = active = embeddings
    expert = model.expert_matrices * d * model.d_ff
    for layer in range(model.n_layers):
        mlp = sum(mlp_params(model, layer, model.n_experts, model.d_ff, model.d_shared,
                             model.d_ff_dense))
        total += attention + mlp
        active += attention + mlp - (0 if model.is_dense(layer) else
                                     (model.n_experts - model.top_k) * expert)
    return total, active


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
    d, heads, kv_heads = model.d_model, len(grid.heads), len(grid.kv_heads)
    n_layers = len(grid.layers)
    seqs = len(grid.sequences(config.workload.batch_size))
    per_token = (model.cache_width if model.attention == "mla"
                 else 2 * kv_heads * model.head_dim)
    ff, shared_ff = len(grid.ff_columns), len(grid.tp_slice(model.d_shared))
    dense_ff = len(grid.tp_slice(model.d_ff_dense))
    mlp = {"expert_weights": 0.0, "router": 0.0}
    for layer in grid.layers:
        stored, selection = mlp_params(model, layer, len(grid.experts), ff, shared_ff,
                                       dense_ff)
        router = 0 if model.is_dense(layer) else d * model.n_experts
        mlp["expert_weights"] += (stored - router) * item
        mlp["router"] += router * item + selection * 4
    attention, biases = attention_params(model, heads, kv_heads)
    out = {
        "kv_cache": float(n_layers * seqs * context * per_token * item),
        "attention_weights": float(n_layers * (attention * item + biases * 4)),
        **mlp,
    }
    if grid.is_last_stage:
        out["lm_head"] = float(d * model.vocab_size * item)
    return out
