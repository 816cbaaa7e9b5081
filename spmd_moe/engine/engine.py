"""The bulk-synchronous layer loop (SPEC §3), one loop for every layout.

Per layer: attention -> router -> permute -> count exchange -> dispatch -> experts ->
combine -> un-permute and weighted sum -> residual. The layout decides who owns what
(topology.py) and how rows meet experts (dispatcher.py); the loop does not branch on it
beyond the TP allreduce after attention.

Pipeline: a rank's prefill is a list of micro-batches (chunks.py): chunks of at most
``chunk_tokens`` tokens of its sequences, or groups of whole sequences. Stage s runs
micro-batch m through its layers once it has m from stage s-1, and sends the hidden rows
to stage s+1 at the same group rank without waiting (``Isend``), then takes m+1. Stages
overlap (fill, steady state, drain); the report gives each stage's idle time beside the
ideal bubble. A chunk attends to its sequence's earlier chunks through the stage's KV cache
(kv_cache.py), which a chunked prefill fills and decode continues.

Overlap (overlap.py): a stage pass is a generator that yields at each exchange it has
started (its receive from the previous stage, the count exchange, dispatch, combine, the TP
allreduces: after attention, of the expert partials, and of a whole-projection q/k norm's
squares) and at checkpoints between compute phases; with two micro-batches in flight,
one's exchanges move while the other computes. Micro-batch m's collectives go on the stage
communicator of slot m % 2.

Decode: the prefill fills a per-rank KV cache of the rank's sequences; each step embeds one
token per live sequence, runs every layer (dispatch and combine included) and takes the
greedy argmax on the last stage, which sends the tokens back to stage 0.

Families (SPEC §8) change named pieces only: multi-head latent attention (model/mla.py) in
place of q/k/v and its latent cache (``new_cache`` chooses), a dense MLP in place of the
MoE half on a model's dense layers, the shared expert inside the MoE half (moe/layer.py).

Notation: B batch, T packed tokens of a micro-batch on this rank, d width, V vocabulary,
L layers, E experts, N new tokens.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from ..backend import kernels
from ..backend.array import F32, Backend, PhaseTimer
from ..core.chunks import MicroBatch, Schedule, overlap_enabled, prefill_schedule
from ..core.config import RunConfig
from ..core.errors import ConfigError, NumericalFault, say
from ..core.topology import Topology
from ..model import mla
from ..model.blocks import (Packed, Rope, add_rms_norm, causal_attention, embed, linear, lm_head,
                            pack, qk_norm_rope, qk_square_sums, residual_add, rms_norm, rope_spec,
                            softmax_scale)
from ..model.inputs import Batch
from ..model.kv_cache import KVCache, LatentCache
from ..model.weights import ModelWeights, build_weights
from ..moe.dispatcher import AllreduceDispatcher, AlltoallDispatcher
from ..moe.layer import dense_steps, moe_steps
from ..parallel.overlap import CHECKPOINT, Flight, run_pass, run_passes
from ..parallel.transport import allreduce_bytes

HIDDEN_TAG, TOKENS_TAG = 11, 12   # MPI keeps order per (source, tag): no per-step tags needed
FAULT_ENV = "SPMD_MOE_FAULT"


FAULT_KINDS = ("raise", "interrupt", "exit", "sleep", "stop", "sigint", "sigterm", "nan")
MAX_FAULT_SECONDS = 86400.0   # a day: time.sleep(1e300) raises OverflowError


@dataclass(frozen=True)
class Fault:
    """``SPMD_MOE_FAULT=RANK:LAYER[:KIND[:SECONDS]]``: rank RANK, the first time it runs
    layer LAYER, does KIND: ``raise`` (a RuntimeError, the default), ``interrupt``
    (KeyboardInterrupt), ``exit`` (SystemExit), ``sleep`` SECONDS (a stall with the rank's
    watchdog alive), ``stop`` (SIGSTOP to itself: a hung GPU or a dead link), ``sigint`` or
    ``sigterm`` (to itself), ``nan`` (the rank's first token at that layer gets NaN router
    input: non-finite router logits, which the run refuses naming the layer). How the
    tests prove that a rank failing, interrupted or stalled mid-run takes the job down
    instead of deadlocking it."""

    rank: int
    layer: int
    kind: str = "raise"
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Fault":
        parts = text.split(":")
        try:
            rank, layer = int(parts[0]), int(parts[1])
            kind = parts[2] if len(parts) > 2 else "raise"
            seconds = float(parts[3]) if len(parts) > 3 else 0.0
        except (IndexError, ValueError):
            raise ConfigError(FAULT_ENV, f"{text!r}: expected RANK:LAYER[:KIND[:SECONDS]]") \
                from None
        if kind not in FAULT_KINDS or len(parts) > 4 or (kind == "sleep") != (len(parts) == 4):
            raise ConfigError(FAULT_ENV, f"{text!r}: KIND is one of {', '.join(FAULT_KINDS)} "
                                         "(sleep takes SECONDS)")
        if not 0 <= seconds <= MAX_FAULT_SECONDS:
            raise ConfigError(FAULT_ENV, f"{text!r}: SECONDS must be a number in [0, "
                                         f"{MAX_FAULT_SECONDS:g}]")
        return cls(rank, layer, kind, seconds)

    def check(self, world_size: int, n_layers: int) -> "Fault":
        """Refuse a fault that would never fire: a silent no-op test proves nothing."""
        if not 0 <= self.rank < world_size:
            raise ConfigError(FAULT_ENV, f"rank {self.rank} does not exist (world size "
                                         f"{world_size})")
        if not 0 <= self.layer < n_layers:
            raise ConfigError(FAULT_ENV, f"layer {self.layer} does not exist (n_layers="
                                         f"{n_layers})")
        return self

    def trigger(self) -> None:
        where = f"({FAULT_ENV}) on rank {self.rank} at layer {self.layer}"
        if self.kind == "raise":
            raise RuntimeError(f"injected fault {where}")
        if self.kind == "interrupt":
            raise KeyboardInterrupt(f"injected {where}")
        if self.kind == "exit":
            raise SystemExit(5)
        # Said on stderr first, so that a test knows the moment (and the pid) to act on.
        say(f"spmd-moe: {FAULT_ENV}: rank {self.rank} (pid {os.getpid()}) {self.kind} at "
            f"layer {self.layer}")
        if self.kind == "sleep":
            time.sleep(self.seconds)
        elif self.kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            os.kill(os.getpid(), signal.SIGINT if self.kind == "sigint" else signal.SIGTERM)


def injected_fault(world_size: int, n_layers: int) -> Fault | None:
    """The fault ``SPMD_MOE_FAULT`` asks for (checked against the job), or None."""
    spec = os.environ.get(FAULT_ENV, "")
    return Fault.parse(spec).check(world_size, n_layers) if spec else None


def fit_kernels_to_family(bk: Backend, model) -> None:
    """Fit the fused kernels to ``model`` and say what runs fused in ``kernels_reason``
    (shown by ``info --model`` and the report), never falling back silently. Attention is
    fused for multi-head and grouped-query heads alike at the head dims the kernel is
    instantiated for; any other head dim leaves attention alone to the generic array code
    (kernels.fit_model), the rest staying fused. The expert FFN is fused for GELU and
    SwiGLU experts, the permutation and RMSNorm always; the router and q/k norm + RoPE
    where the model fits them (FusedKernels.fit_rowwise). Idempotent."""
    if bk.kernels is None:
        return
    kernels.fit_model(bk, model.head_dim, model.v_dim)
    bk.kernels = bk.kernels.fit_rowwise(
        model.n_experts, model.n_heads, model.kv_heads, model.qk_norm, model.rope_width,
        model.router_score, model.kv_lora_rank if model.attention == "mla" else 0,
        model.kv_lora_rank + model.rope_width, bk.dtype.itemsize)
    pieces = [f"{model.activation} experts"]
    if model.attention == "mla":
        parts = ([f"prefill of head dim {model.head_dim} with values of {model.v_dim}"]
                 if bk.kernels.fused_attention else [])
        parts += ["decode over the latent cache"] if bk.kernels.fuses("mla_decode") else []
        if parts:
            pieces.insert(0, f"latent attention ({', '.join(parts)})")
    elif bk.kernels.fused_attention:
        heads = ("multi-head" if model.kv_heads == model.n_heads else
                 f"grouped-query ({model.n_heads // model.kv_heads} query heads per K/V head)")
        pieces.insert(0, f"{heads} attention of head dim {model.head_dim}")
    bk.kernels_reason = (f"{bk.kernels.describe()}; {model.family} model: fused "
                         f"{' and '.join(pieces)}")


@dataclass
class StageOutput:
    """What one rank produced in a prefill: its last-stage rows (empty elsewhere), in its
    sequences' order (micro-batches follow the sequences: chunks.py)."""

    hidden: list[object] = field(default_factory=list)     # per micro-batch [T, d]
    logits: list[object] = field(default_factory=list)     # per micro-batch float32 [b', V]
    expert_counts: np.ndarray | None = None                 # [L, E] this rank's rows
    schedule: Schedule | None = None


class Engine:
    """One rank's share of the model and the loop that runs it."""

    def __init__(self, config: RunConfig, topo: Topology, bk: Backend, transport,
                 weights: ModelWeights | None = None, dispatchers: list | None = None):
        """``dispatchers``: one per slot of micro-batches in flight (default: the layout's,
        each on its stage communicator; the bench's layer step passes a loop-back)."""
        self.config, self.model, self.topo, self.bk = config, config.model, topo, bk
        self.transport = transport
        fit_kernels_to_family(bk, self.model)
        self.weights = weights if weights is not None else build_weights(
            topo, bk, config.seed, config.init)
        kind = AllreduceDispatcher if topo.layout.tp > 1 else AlltoallDispatcher
        # One dispatcher per slot of micro-batches in flight, each on its own communicator.
        self.dispatchers = dispatchers or [
            kind(bk, comm, transport, self.model.n_experts, self.model.top_k, topo.experts)
            for comm in topo.stage_comms]
        self.heads = len(topo.heads)
        self.kv_heads = len(topo.kv_heads)
        # Under TP with more ranks than K/V heads each K/V head sits on tp/H_kv ranks: a sum
        # over the group counts it that often, and so must the width it is divided by.
        self.kv_width_summed = self.model.kv_width * max(
            1, topo.layout.tp // self.model.kv_heads)
        self.scale = softmax_scale(self.model)
        self.rope = rope_spec(self.model)
        self.inv_freq = bk.asarray(self.rope.inv_freq)    # on the device once
        fault = injected_fault(topo.size, self.model.n_layers)
        self.fault = fault if fault is not None and fault.rank == topo.rank else None
        self.poisoned_layer: int | None = None    # the ``nan`` fault's layer, while it runs
        self.pending: list = []   # sends to the next stage started by the current pass

    # --- one layer ---------------------------------------------------------------------

    def attention_steps(self, layer: int, x, packed: Packed, rope, timer: PhaseTimer,
                        flight: Flight, cache: KVCache | None, slot: int = 0):
        """x: [T, d] -> attention output [T, d]: storage dtype, or a float32 partial sum
        over this rank's heads under TP. A generator (overlap.py): a norm over the whole q
        and k projections (``qk_norm`` ``full``) under TP yields the group's sum of squares,
        an allreduce on ``slot``'s communicator."""
        bk, lw, model = self.bk, self.weights.layers[layer], self.model
        n, dh = x.shape[0], model.head_dim
        out_dtype = F32 if self.topo.layout.tp > 1 else None   # TP: partial sums
        if model.attention == "mla":
            with timer.phase("attention"):
                a = rms_norm(bk, x, lw.attn_norm, model.norm_eps)
                att = mla.attention(bk, lw, model, a, packed, rope, cache, layer, self.heads,
                                    self.scale)                            # [T, h*Dv]
                return bk.matmul(att, lw.wo, out_dtype=out_dtype)
        with timer.phase("attention"):
            a = rms_norm(bk, x, lw.attn_norm, model.norm_eps)
            q = linear(bk, a, lw.wq, lw.bq).reshape(n, self.heads, dh)    # [T, h, Dh]
            k = linear(bk, a, lw.wk, lw.bk).reshape(n, self.kv_heads, dh) # [T, hk, Dh]
            v = linear(bk, a, lw.wv, lw.bv).reshape(n, self.kv_heads, dh)
            summed = None
            if model.qk_norm == "full" and self.topo.layout.tp > 1:
                summed = qk_square_sums(bk, q, k)                          # [T, 2] f32
        if summed is not None:
            # Non-blocking like every collective of a pass: a blocking one could wait on a
            # rank that is itself blocked in the other pass's (overlap.py).
            comm = self.topo.stage_comms[slot]
            partial = summed
            summed = yield flight.start(
                "attn_allreduce", lambda: self.transport.iallreduce_sum(comm, partial),
                allreduce_bytes(partial.nbytes, self.topo.layout.tp))
        with timer.phase("attention"):
            q, k = qk_norm_rope(bk, model.qk_norm, q, k, lw.q_norm, lw.k_norm,
                                model.norm_eps, model.q_width, self.kv_width_summed, summed,
                                rope)
            if cache is None:
                keys, values = k, v
                k_starts, k_lengths = packed.starts_host, packed.lengths_host
            else:
                cache.write(layer, packed, k, v)
                keys, values, k_starts, k_lengths = cache.view(layer, packed)
            att = causal_attention(bk, q, packed.starts_host, packed.lengths_host, keys,
                                   values, k_starts, k_lengths, self.scale)   # [T, h*Dh]
            return bk.matmul(att, lw.wo, out_dtype=out_dtype)

    def layer_steps(self, layer: int, x, packed: Packed, rope, timer: PhaseTimer,
                    flight: Flight, cache: KVCache | None, counts: np.ndarray, slot: int = 0):
        """x: [T, d] -> x after this layer, [T, d]; adds this rank's routed rows to
        ``counts[layer]``. A generator that yields each exchange it starts, and checkpoints
        between compute phases (overlap.py); its collectives go on ``slot``'s
        communicator."""
        bk, lw = self.bk, self.weights.layers[layer]
        self._at_layer(layer, timer)
        att = yield from self.attention_steps(layer, x, packed, rope, timer, flight, cache,
                                              slot)
        yield CHECKPOINT
        if self.topo.layout.tp > 1:
            comm = self.topo.stage_comms[slot]
            att = yield flight.start(
                "attn_allreduce", lambda: self.transport.iallreduce_sum(comm, att),
                allreduce_bytes(att.nbytes, self.topo.layout.tp))
            with timer.phase("attn_allreduce"):
                # Summed in float32, then rounded once, as the whole product would be.
                att = bk.store(att)
        with timer.phase("router"):
            # The residual add and the MoE norm: one kernel with the fused kernels.
            h, b = add_rms_norm(bk, x, att, lw.moe_norm, self.model.norm_eps)
            if self.poisoned_layer == layer and b.shape[0]:
                b[0] = np.nan                             # SPMD_MOE_FAULT's ``nan``
                self.poisoned_layer = None
        if self.model.is_dense(layer):
            moe, tokens_per_expert = yield from dense_steps(
                self.dispatchers[slot], b, lw, self.model.n_experts, timer, flight)
        else:
            try:
                moe, tokens_per_expert = yield from moe_steps(self.dispatchers[slot], b, lw,
                                                              self.model, timer, flight)
            except NumericalFault as fault:
                raise NumericalFault(f"layer {layer}: {fault}") from None
        if self.topo.writes_outputs:
            counts[layer] += tokens_per_expert
        with timer.phase("residual"):
            return residual_add(bk, h, moe)

    def _at_layer(self, layer: int, timer: PhaseTimer) -> None:
        """Fault injection and progress marks: the pass's layer on the timer's cursor
        (the watchdog's layer and the trace's), and one stage pass
        (a micro-batch through the stage) counted at the stage's first layer."""
        timer.cursor.at_layer(layer)
        if layer == self.topo.layers.start:
            timer.count("stage_passes", 1)
        if self.fault is not None and layer == self.fault.layer:
            fault, self.fault = self.fault, None          # once
            if fault.kind == "nan":
                self.poisoned_layer = layer
            else:
                fault.trigger()

    # --- a pass of new tokens through this rank's stage ---------------------------------

    def pass_steps(self, packed: Packed, tokens_host: np.ndarray | None, timer: PhaseTimer,
                   flight: Flight, cache: KVCache | None, counts: np.ndarray, slot: int = 0):
        """Run ``packed``'s new tokens through this stage: embed (first stage) or receive
        them from the previous stage, run the layers, then send them on (returns None) or,
        on the last stage, return the hidden rows [T, d]. A generator (overlap.py); micro-
        batch m runs in slot m % 2."""
        topo, bk, d = self.topo, self.bk, self.model.d_model
        if topo.is_first_stage:
            with timer.phase("embed"):
                x = embed(bk, self.weights.embed, bk.asarray(tokens_host))
        else:
            # Yielded like an exchange: a micro-batch waiting for its input does not hold
            # back the one in flight beside it.
            x = yield flight.start("stage_recv", lambda: self.transport.irecv(
                topo.pipe_comm, (packed.n_tokens, d), bk.dtype, source=topo.stage - 1,
                tag=HIDDEN_TAG))
        rope = Rope(bk, packed.positions, self.rope, self.inv_freq)
        for layer in topo.layers:
            x = yield from self.layer_steps(layer, x, packed, rope, timer, flight, cache,
                                            counts, slot)
        if cache is not None:
            cache.advance(packed)
        timer.cursor.leave_layers()
        if topo.is_last_stage:
            return x
        with timer.phase("stage_send"):
            self.pending.append(self.transport.isend(topo.pipe_comm, x, topo.stage + 1,
                                                     HIDDEN_TAG))
        timer.add_bytes("stage_send", x.nbytes)
        return None

    def stage_pass(self, packed: Packed, tokens_host: np.ndarray | None, timer: PhaseTimer,
                   cache: KVCache | None, counts: np.ndarray):
        """:meth:`pass_steps` run to its end on its own (no overlap)."""
        flight = Flight(timer)
        return run_pass(self.pass_steps(packed, tokens_host, timer, flight, cache, counts),
                        flight)

    def finish_sends(self, timer: PhaseTimer) -> None:
        """Wait for this pass's sends to the next stage: the pipeline's drain."""
        with timer.phase("stage_drain"):
            for request in self.pending:
                request.Wait()
        self.pending = []

    def logits_of(self, hidden, packed: Packed, timer: PhaseTimer,
                  ends: np.ndarray | None = None):
        """Last-token logits [b', V] float32 of each sequence in ``packed`` whose last token
        it holds (``ends``: which; default all)."""
        with timer.phase("lm_head"):
            rows = packed.last_rows_host if ends is None else packed.last_rows_host[ends]
            last = self.bk.take_rows(hidden, self.bk.asarray(rows))
            return lm_head(self.bk, last, self.weights.final_norm, self.weights.lm_head,
                           self.model.norm_eps)

    def overlaps(self, micro_batches: int) -> bool:
        """Whether two micro-batches go in flight (the ``overlap`` setting; ``auto``: where
        it can pay, chunks.overlap_pays)."""
        layout = self.topo.layout
        return overlap_enabled(self.config.workload.overlap, micro_batches, layout.pp,
                               layout.group, self.bk.name)

    # --- prefill -----------------------------------------------------------------------

    def schedule(self, batch: Batch) -> Schedule:
        """This rank's prefill micro-batches (the same count on every rank of its stage)."""
        return prefill_schedule(self.topo, self.config.workload, batch.lengths, self.bk.name)

    def chunk_ids(self, batch: Batch, mb: MicroBatch) -> np.ndarray:
        """The token ids of ``mb``'s chunks, packed end to end (int64 [T]): with left
        padding, position p of sequence s is column ``S - length[s] + p``."""
        offset = batch.seq_len - batch.lengths[mb.seqs] + mb.starts
        columns = np.repeat(offset - np.concatenate([[0], np.cumsum(mb.lengths)[:-1]]),
                            mb.lengths) + np.arange(mb.n_tokens)
        return batch.ids[np.repeat(mb.seqs, mb.lengths), columns]

    def prefill(self, batch: Batch, timer: PhaseTimer, cache: KVCache | None = None,
                keep_hidden: bool = True, flight: Flight | None = None) -> StageOutput:
        """The forward pass of SPEC §1 over this rank's share of ``batch``.

        Every rank holds the whole ``batch`` (host). Returns, on last-stage ranks, the
        hidden rows and last-token logits of the rank's sequences; everywhere, the rank's
        routed-row counts per (layer, expert). ``cache``: the decode's, filled here; without
        one, a chunked schedule that splits a sequence gets its own for the pass.
        """
        self.pending = []
        flight = flight if flight is not None else Flight(timer)
        schedule = self.schedule(batch)
        if cache is None and schedule.splits_sequences:
            cache = self.new_cache(batch, 0)
        out = StageOutput(expert_counts=np.zeros((self.model.n_layers, self.model.n_experts),
                                                 dtype=np.int64), schedule=schedule)

        def prefill_pass(m: int, mb: MicroBatch):
            timer.cursor.start_pass(m, mb.n_tokens)
            packed = pack(self.bk, mb.seqs, mb.lengths, mb.starts)
            ids = self.chunk_ids(batch, mb) if self.topo.is_first_stage else None
            hidden = yield from self.pass_steps(packed, ids, timer, flight, cache,
                                                out.expert_counts, m % 2)
            if hidden is None:
                return None
            return self.logits_of(hidden, packed, timer, mb.ends), (
                hidden if keep_hidden else None)

        finished = run_passes([prefill_pass(m, mb) for m, mb in enumerate(schedule.micro_batches)],
                              flight, self.overlaps(schedule.count))
        timer.cursor.end()
        for result in finished:
            if result is not None:
                out.logits.append(result[0])
                out.hidden.append(result[1])
        self.finish_sends(timer)
        return out

    # --- decode ------------------------------------------------------------------------

    def decode_micro_batches(self, batch_size: int) -> list[np.ndarray]:
        """This rank's sequences in the decode steps' micro-batches (``micro_batches``
        groups, default one per stage)."""
        return [np.arange(r.start, r.stop) for r in
                self.topo.micro_batches(batch_size, self.config.workload.micro_batches)]

    def new_cache(self, batch: Batch, new_tokens: int) -> KVCache | LatentCache:
        """A cache for this rank's sequences, sized for the longest prompt plus N tokens:
        the family's (MLA keeps the latent: LatentCache)."""
        mine = self.topo.sequences(batch.batch_size)
        capacity = int(batch.lengths.max()) + new_tokens
        model = self.model
        if model.attention == "mla":
            return LatentCache(self.bk, self.topo.layers, mine.start, len(mine), capacity,
                               model.kv_lora_rank, model.rope_width)
        return KVCache(self.bk, self.topo.layers, mine.start, len(mine), capacity,
                       self.kv_heads, model.head_dim)

    def sample(self, logits, timer: PhaseTimer) -> np.ndarray:
        """Greedy tokens [b] (host int64) from float32 logits [b, V]; ties: lowest id."""
        with timer.phase("sample"):
            return self.bk.to_host(self.bk.xp.argmax(logits, axis=-1)).astype(np.int64)

    def decode_step(self, micro: list[np.ndarray], last_tokens: list[np.ndarray],
                    cache: KVCache, timer: PhaseTimer, counts: np.ndarray,
                    flight: Flight | None = None) -> list[np.ndarray]:
        """One token per live sequence through every stage.

        ``last_tokens[m]`` (read with one stage only; with several, stage 0 receives them
        from the last stage): the token each sequence of micro-batch m took last step, -1
        once it has stopped. Returns the new tokens per
        micro-batch on the last stage (-1 for stopped sequences), empty arrays elsewhere.
        """
        topo = self.topo
        self.pending = []
        flight = flight if flight is not None else Flight(timer)

        def decode_pass(m: int, seqs: np.ndarray):
            timer.cursor.start_pass(m, len(seqs))
            if topo.layout.pp == 1:
                tokens = last_tokens[m]
            else:
                # Stage 0 gets the tokens from the last stage; each stage passes them on
                # ahead of the hidden rows, so every stage knows which sequences are live.
                source = topo.layout.pp - 1 if topo.is_first_stage else topo.stage - 1
                tokens = (yield flight.start(
                    "token_return" if topo.is_first_stage else "stage_recv",
                    lambda: self.transport.irecv(topo.pipe_comm, (len(seqs), 1), np.int64,
                                                 source=source, tag=TOKENS_TAG)))[:, 0]
                if not topo.is_last_stage:
                    self.pending.append(self.transport.isend(
                        topo.pipe_comm, tokens[:, None], topo.stage + 1, TOKENS_TAG))
            live = tokens >= 0
            seqs_live = seqs[live]
            positions = cache.lengths_host[seqs_live - cache.first_seq]
            packed = pack(self.bk, seqs_live, np.ones(len(seqs_live), dtype=np.int64), positions)
            hidden = yield from self.pass_steps(packed, tokens[live], timer, flight, cache,
                                                counts, m % 2)
            if hidden is None:
                return np.zeros(0, dtype=np.int64)
            chosen = np.full(len(seqs), -1, dtype=np.int64)
            chosen[live] = self.sample(self.logits_of(hidden, packed, timer), timer)
            return chosen

        new = run_passes([decode_pass(m, seqs) for m, seqs in enumerate(micro)], flight,
                         self.overlaps(len(micro)))
        timer.cursor.end()
        self.finish_sends(timer)
        return new

    def return_tokens(self, tokens: list[np.ndarray], timer: PhaseTimer) -> list:
        """Last stage -> first stage: the tokens each micro-batch's next step embeds.
        Returns the started sends; the caller waits on them once the run is done."""
        if self.topo.layout.pp == 1 or not self.topo.is_last_stage:
            return []
        with timer.phase("token_return"):
            return [self.transport.isend(self.topo.pipe_comm, chosen[:, None], 0, TOKENS_TAG)
                    for chosen in tokens]
