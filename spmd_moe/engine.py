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
allreduces) and at checkpoints between compute phases; with two micro-batches in flight,
one's exchanges move while the other computes. Micro-batch m's collectives go on the stage
communicator of slot m % 2.

Decode: the prefill fills a per-rank KV cache of the rank's sequences; each step embeds one
token per live sequence, runs every layer (dispatch and combine included) and takes the
greedy argmax on the last stage, which sends the tokens back to stage 0.

Notation: B batch, T packed tokens of a micro-batch on this rank, d width, V vocabulary,
L layers, E experts, N new tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .backend import F32, Backend, PhaseTimer
from .chunks import MicroBatch, Schedule, prefill_schedule
from .config import RunConfig
from .data import Batch
from .dispatcher import AllreduceDispatcher, AlltoallDispatcher
from .kv_cache import KVCache
from .model import Packed, apply_rope, causal_attention, embed, lm_head, pack, rms_norm, rope_tables
from .moe_layer import moe_steps
from .overlap import CHECKPOINT, Flight, overlap_enabled, run_pass, run_passes
from .topology import Topology
from .transport import allreduce_bytes
from .weights import ModelWeights, build_weights

# The order phases appear in reports.
PHASES = ("embed", "stage_recv", "attention", "attn_allreduce", "router", "permute",
          "count_exchange", "dispatch", "experts", "combine", "unpermute", "residual",
          "lm_head", "sample", "stage_send", "stage_drain", "token_return")
# Phases in which a rank waits on another stage, not works: its pipeline idle time.
IDLE_PHASES = ("stage_recv", "stage_drain")
HIDDEN_TAG, TOKENS_TAG = 11, 12   # MPI keeps order per (source, tag): no per-step tags needed
FAULT_ENV = "SPMD_MOE_FAULT"


def injected_fault(rank: int) -> int | None:
    """``SPMD_MOE_FAULT=RANK:LAYER`` makes that rank raise at that layer: how the tests
    prove that a rank failing mid-run takes the job down instead of deadlocking it."""
    spec = os.environ.get(FAULT_ENV, "")
    fault_rank, _, fault_layer = spec.partition(":")
    if spec and int(fault_rank) == rank:
        return int(fault_layer)
    return None


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
                 weights: ModelWeights | None = None):
        self.config, self.model, self.topo, self.bk = config, config.model, topo, bk
        self.transport = transport
        kernels.fit_model(bk, self.model.head_dim)
        self.weights = weights if weights is not None else build_weights(
            topo, bk, config.seed, config.init)
        kind = AllreduceDispatcher if topo.layout.tp > 1 else AlltoallDispatcher
        # One dispatcher per slot of micro-batches in flight, each on its own communicator.
        self.dispatchers = [kind(bk, comm, transport, self.model.n_experts, self.model.top_k,
                                 topo.experts) for comm in topo.stage_comms]
        self.heads = len(topo.heads)
        self.scale = float(self.model.head_dim) ** -0.5
        self.fault_layer = injected_fault(topo.rank)
        self.pending: list = []   # sends to the next stage started by the current pass

    # --- one layer ---------------------------------------------------------------------

    def attention(self, layer: int, x, packed: Packed, rope, cache: KVCache | None):
        """x: [T, d] -> attention output [T, d]: storage dtype, or a float32 partial sum
        over this rank's heads under TP."""
        bk, lw, dh = self.bk, self.weights.layers[layer], self.model.head_dim
        n = x.shape[0]
        a = rms_norm(bk, x, lw.attn_norm, self.model.norm_eps)
        q = bk.matmul(a, lw.wq).reshape(n, self.heads, dh)                # [T, h, Dh]
        k = bk.matmul(a, lw.wk).reshape(n, self.heads, dh)
        v = bk.matmul(a, lw.wv).reshape(n, self.heads, dh)
        q, k = apply_rope(bk, q, *rope), apply_rope(bk, k, *rope)
        if cache is None:
            keys, values = k, v
            k_starts, k_lengths = packed.starts_host, packed.lengths_host
        else:
            cache.write(layer, packed, k, v)
            keys, values, k_starts, k_lengths = cache.view(layer, packed)
        att = causal_attention(bk, q, packed.starts_host, packed.lengths_host, keys, values,
                               k_starts, k_lengths, self.scale)           # [T, h*Dh]
        return bk.matmul(att, lw.wo, out_dtype=F32 if self.topo.layout.tp > 1 else None)

    def layer_steps(self, layer: int, x, packed: Packed, rope, timer: PhaseTimer,
                    flight: Flight, cache: KVCache | None, counts: np.ndarray, slot: int = 0):
        """x: [T, d] -> x after this layer, [T, d]; adds this rank's routed rows to
        ``counts[layer]``. A generator that yields each exchange it starts, and checkpoints
        between compute phases (overlap.py); its collectives go on ``slot``'s
        communicator."""
        bk, lw = self.bk, self.weights.layers[layer]
        if layer == self.fault_layer:
            raise RuntimeError(f"injected fault ({FAULT_ENV}) on rank {self.topo.rank} at "
                               f"layer {layer}")
        with timer.phase("attention"):
            att = self.attention(layer, x, packed, rope, cache)
        yield CHECKPOINT
        if self.topo.layout.tp > 1:
            comm = self.topo.stage_comms[slot]
            att = yield flight.start(
                "attn_allreduce", lambda: self.transport.iallreduce_sum(comm, att),
                allreduce_bytes(att.nbytes, self.topo.layout.tp))
            with timer.phase("attn_allreduce"):
                # Summed in float32, then rounded once, as the whole product would be.
                att = bk.store(att)
        with timer.phase("attention"):
            h = bk.store(x.astype(F32) + att.astype(F32))
        with timer.phase("router"):
            b = rms_norm(bk, h, lw.moe_norm, self.model.norm_eps)
        moe, tokens_per_expert = yield from moe_steps(self.dispatchers[slot], b, lw,
                                                      self.model.top_k, timer, flight)
        if self.topo.writes_outputs:
            counts[layer] += tokens_per_expert
        with timer.phase("residual"):
            return bk.store(h.astype(F32) + moe)

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
        rope = rope_tables(bk, packed.positions, self.model.head_dim, self.model.rope_theta)
        for layer in topo.layers:
            x = yield from self.layer_steps(layer, x, packed, rope, timer, flight, cache,
                                            counts, slot)
        if cache is not None:
            cache.advance(packed)
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
        it can pay, overlap.overlap_pays)."""
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

        def one(m: int, mb: MicroBatch):
            packed = pack(self.bk, mb.seqs, mb.lengths, mb.starts)
            ids = self.chunk_ids(batch, mb) if self.topo.is_first_stage else None
            hidden = yield from self.pass_steps(packed, ids, timer, flight, cache,
                                                out.expert_counts, m % 2)
            if hidden is None:
                return None
            return self.logits_of(hidden, packed, timer, mb.ends), (
                hidden if keep_hidden else None)

        finished = run_passes([one(m, mb) for m, mb in enumerate(schedule.micro_batches)],
                              flight, self.overlaps(schedule.count))
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

    def new_cache(self, batch: Batch, new_tokens: int) -> KVCache:
        """A cache for this rank's sequences, sized for the longest prompt plus N tokens."""
        mine = self.topo.sequences(batch.batch_size)
        capacity = int(batch.lengths.max()) + new_tokens
        return KVCache(self.bk, self.topo.layers, mine.start, len(mine), capacity, self.heads,
                       self.model.head_dim)

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

        def one(m: int, seqs: np.ndarray):
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

        new = run_passes([one(m, seqs) for m, seqs in enumerate(micro)], flight,
                         self.overlaps(len(micro)))
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
