"""Chunked prefill: how a rank's sequences become the micro-batches of the pipeline.

A micro-batch is a list of *chunks*, each a run of consecutive real tokens of one sequence
(padding is dropped at the edge, model/inputs.py, so a chunk never holds padding). Chunk c of a
sequence attends to the keys and values of its earlier chunks, which the same stage
computed before and keeps in its KV cache (SPEC §2's last bullet; engine.py, kv_cache.py).

Two schedules, both computed by every rank from data every rank has (the batch's lengths
and the layout), so that all ranks of a stage agree on the micro-batch count and their
collectives pair up:

- **chunks** (``chunk_tokens`` N, the default): a rank's real tokens, sequence after
  sequence, are cut into micro-batches of N tokens; a micro-batch thus holds at most N
  tokens of the rank and at most N of any one sequence, and packs the ends and starts of
  several sequences when they are short or a boundary falls inside one. The stage's count
  is the largest of its ranks' (the others get empty micro-batches at the end).
- **whole sequences** (``micro_batches`` M > 0): each rank's sequences split into M
  contiguous groups, as before chunking existed.

The default N (``chunk_tokens = 0``) is derived from the layout, the batch and the backend
by :func:`default_chunk_tokens`; docs/ARCHITECTURE.md has the arithmetic.

Notation: B batch, b chunks of a micro-batch, N chunk tokens, M micro-batches, P stages.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .config import Layout, ModelConfig, WorkloadConfig
from .topology import Grid, block_range

# The default chunk size (docs/ARCHITECTURE.md, "Chunked prefill"):
BUBBLE_TARGET = 0.10          # ideal bubble (P-1)/(M+P-1) at most this: M >= 9 (P-1)
# Rows each expert needs per micro-batch for its GEMMs to run near their plateau: on an
# H100 a bf16 [m, 4096] x [4096, 16384] GEMM is compute-bound from m ~ 300 (989 TFLOP/s /
# 3.35 TB/s) and fills 132 SMs with 128x256 tiles in whole waves from m ~ 1024; NumPy's
# BLAS reaches ~90% of its plateau at 128 rows (docs/PERFORMANCE.md).
MIN_EXPERT_ROWS = {"cupy": 1024, "numpy": 128}
# Beyond this many tokens per rank a micro-batch gains nothing (GEMMs are at their plateau,
# the fixed cost of a micro-batch is < 5% of its work) and only costs activation memory.
MAX_CHUNK_TOKENS = 16384


@dataclass(frozen=True)
class MicroBatch:
    """Chunks of one micro-batch on one rank (host arrays, b chunks, one per sequence)."""

    seqs: np.ndarray       # int64 [b] global sequence index of each chunk
    starts: np.ndarray     # int64 [b] position of each chunk's first token in its sequence
    lengths: np.ndarray    # int64 [b] tokens of each chunk
    ends: np.ndarray       # bool [b] whether the chunk ends its sequence

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @staticmethod
    def empty() -> "MicroBatch":
        none = np.zeros(0, dtype=np.int64)
        return MicroBatch(none, none, none, np.zeros(0, dtype=bool))


def whole_sequences(seqs: range, lengths: np.ndarray, count: int) -> list[MicroBatch]:
    """``seqs`` (with ``lengths[seq]`` real tokens) in ``count`` contiguous groups of whole
    sequences; the first ``len(seqs) % count`` groups one longer, some maybe empty."""
    out = []
    for m in range(count):
        part = block_range(len(seqs), count, m)
        ids = np.arange(seqs.start + part.start, seqs.start + part.stop, dtype=np.int64)
        out.append(MicroBatch(ids, np.zeros(len(ids), dtype=np.int64),
                              lengths[ids].astype(np.int64), np.ones(len(ids), dtype=bool)))
    return out


def chunked(seqs: range, lengths: np.ndarray, budget: int) -> list[MicroBatch]:
    """``seqs``' real tokens, sequence after sequence, cut into micro-batches of ``budget``
    tokens (the last may hold fewer); each micro-batch's chunks in sequence order."""
    assert budget >= 1
    ids = np.arange(seqs.start, seqs.stop, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(lengths[ids].astype(np.int64))])  # [s+1] offsets
    total = int(first[-1])
    if total == 0:
        return []
    # Chunks are the pieces of the token stream between sequence starts and multiples of
    # the budget.
    cuts = np.union1d(first, np.arange(0, total + 1, budget, dtype=np.int64))
    cuts = np.union1d(cuts, [total])
    begin, end = cuts[:-1], cuts[1:]                                      # [c]
    seq = np.searchsorted(first, begin, side="right") - 1                 # [c]
    micro = begin // budget                                               # [c]
    splits = np.flatnonzero(np.diff(micro)) + 1
    out = []
    for part in np.split(np.arange(len(begin)), splits):
        pick = seq[part]
        out.append(MicroBatch(ids[pick], begin[part] - first[pick], end[part] - begin[part],
                              end[part] == first[pick + 1]))
    return out


@dataclass(frozen=True)
class ChunkChoice:
    """The chunk size in force: ``tokens`` (None: whole-sequence micro-batches) and why."""

    tokens: int | None
    reason: str


def _rank_lengths(grid: Grid, lengths: np.ndarray) -> np.ndarray:
    """The lengths of ``grid``'s rank's sequences: a view (indexing by the range would copy
    a batch-sized index and the lengths)."""
    seqs = grid.sequences(len(lengths))
    return lengths[seqs.start:seqs.stop]


def _group_grids(grid: Grid) -> list[Grid]:
    """The ranks of ``grid``'s stage (the ones whose schedules must pair up)."""
    group = grid.layout.group
    return [Grid(grid.layout, grid.model, grid.stage * group + g) for g in range(group)]


def default_chunk_tokens(model: ModelConfig, layout: Layout, lengths: np.ndarray,
                         backend: str = "cupy") -> ChunkChoice:
    """The default chunk size: ``min(MAX, max(N_bubble, N_gemm))`` where

    - ``N_bubble = floor(T / M_target)``: T the most real tokens one rank of a stage holds,
      ``M_target = ceil((P-1)(1-b)/b)`` micro-batches for an ideal bubble of at most
      ``b = BUBBLE_TARGET`` with P > 1 stages (135 at P = 16), 2 with one stage (so that
      two micro-batches can overlap one's exchanges with the other's compute);
    - ``N_gemm = ceil(R E / (k g))``: the fewest tokens per rank that give every expert
      ``R = MIN_EXPERT_ROWS[backend]`` rows per micro-batch when the stage's g ranks (ep,
      or 1 under TP, whose ranks share the same tokens) route k of E experts per token;
    - ``MAX = MAX_CHUNK_TOKENS`` bounds activation memory whatever the batch.

    The bubble wins when the batch is large enough to keep the GEMMs efficient ("when the
    batch allows"); otherwise the GEMM floor does and the bubble is what it is."""
    grid = Grid(layout, model, 0)
    per_rank = [int(_rank_lengths(g, lengths).sum()) if len(lengths) else 0
                for g in _group_grids(grid)]
    most = max(per_rank) if per_rank else 0
    stages = layout.pp
    if stages > 1:
        target = int(np.ceil((stages - 1) * (1 - BUBBLE_TARGET) / BUBBLE_TARGET - 1e-9))
    else:
        target = 2
    bubble = max(1, most // target)
    rows = MIN_EXPERT_ROWS.get(backend, MIN_EXPERT_ROWS["cupy"])
    routing_ranks = layout.ep if layout.tp == 1 else 1
    gemm = -(-rows * model.n_experts // (model.top_k * routing_ranks))
    tokens = min(MAX_CHUNK_TOKENS, max(bubble, gemm))
    limit = ("the cap" if tokens == MAX_CHUNK_TOKENS and max(bubble, gemm) > tokens else
             "the bubble target" if bubble >= gemm else "the GEMM floor")
    goal = (f"bubble <= {BUBBLE_TARGET:.0%} over {stages} stages needs" if stages > 1 else
            "two in flight (overlap) need")
    reason = (f"default, set by {limit}: {goal} >= {target} micro-batches of the {most} "
              f"tokens a rank holds (<= {bubble} tokens each); expert GEMMs of >= {rows} "
              f"rows need >= {gemm}; cap {MAX_CHUNK_TOKENS}")
    return ChunkChoice(tokens, reason)


def chunk_choice(model: ModelConfig, layout: Layout, workload: WorkloadConfig,
                 lengths: np.ndarray, backend: str = "cupy") -> ChunkChoice:
    """What the workload asks for: whole sequences (``micro_batches`` > 0), the given
    ``chunk_tokens``, or the default."""
    if workload.micro_batches:
        return ChunkChoice(None, f"whole sequences in {workload.micro_batches} "
                                 "micro-batch(es) per rank (micro_batches)")
    if workload.chunk_tokens:
        return ChunkChoice(workload.chunk_tokens, "chunk_tokens")
    return default_chunk_tokens(model, layout, lengths, backend)


@dataclass(frozen=True)
class Schedule:
    """One rank's prefill micro-batches, as many as every rank of its stage has."""

    micro_batches: list[MicroBatch]
    chunk: ChunkChoice
    stage_tokens: list[int] = field(default_factory=list)   # [M] the stage's tokens per mb

    @property
    def count(self) -> int:
        return len(self.micro_batches)

    @property
    def splits_sequences(self) -> bool:
        """Whether some sequence of this rank spans several micro-batches: its later chunks
        then need the earlier ones' keys, so the stage keeps a KV cache during prefill."""
        return any(not mb.ends.all() for mb in self.micro_batches if len(mb.ends))

    @property
    def largest_tokens(self) -> int:
        return max((mb.n_tokens for mb in self.micro_batches), default=0)


def rank_micro_batches(grid: Grid, choice: ChunkChoice, lengths: np.ndarray,
                       count: int) -> list[MicroBatch]:
    """``grid``'s rank's micro-batches under ``choice`` (``count``: whole-sequence groups)."""
    seqs = grid.sequences(len(lengths))
    if choice.tokens is None:
        return whole_sequences(seqs, lengths, count)
    return chunked(seqs, lengths, choice.tokens)


def prefill_schedule(grid: Grid, workload: WorkloadConfig, lengths: np.ndarray,
                     backend: str = "cupy") -> Schedule:
    """``grid``'s rank's prefill schedule for a batch of ``lengths`` real tokens per
    sequence [B]. Pure: every rank computes every rank of its stage's lists and pads its own
    to the longest with empty micro-batches. (The arrays are shared between calls: read
    them, never write them.)"""
    lengths = np.asarray(lengths, dtype=np.int64)
    choice, stage, stage_tokens = _stage_schedule(grid.layout, grid.model, grid.stage,
                                                  workload, lengths.tobytes(), backend)
    mine = stage[grid.group_rank]
    mine = mine + [MicroBatch.empty()] * (len(stage_tokens) - len(mine))
    return Schedule(mine, choice, list(stage_tokens))


@dataclass(frozen=True)
class ScheduleSize:
    """What the memory check needs of a rank's prefill schedule, with the same values as
    :func:`prefill_schedule` gives (tests/test_chunks.py holds them equal), computed by
    arithmetic over the lengths: runner.plan_session checks a batch before anything its
    size is allocated, and a schedule of 10^7 sequences would itself take gigabytes."""

    chunk: ChunkChoice
    count: int                  # micro-batches per rank, the same on every rank of the stage
    largest_tokens: int         # this rank's largest micro-batch
    largest_stage_tokens: int   # the stage's largest (its ranks' tokens; one rank's under TP)
    splits_sequences: bool      # some sequence of this rank spans micro-batches


def _group_tokens(lengths: np.ndarray, count: int) -> np.ndarray:
    """Tokens of each of ``count`` contiguous whole-sequence groups (whole_sequences) of
    sequences with ``lengths`` [s] -> int64 [count]."""
    base, extra = divmod(len(lengths), count)
    index = np.arange(count + 1, dtype=np.int64)
    bounds = index * base + np.minimum(index, extra)                       # [count+1]
    if base:                       # no group empty: sums in place, no [s] temporary
        return np.add.reduceat(lengths, bounds[:-1]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])   # [s+1], s < count
    return np.diff(offsets[bounds])


def _splits_a_sequence(lengths: np.ndarray, budget: int, block: int = 1 << 20) -> bool:
    """Whether cutting the token stream of sequences with ``lengths`` [s] every ``budget``
    tokens (:func:`chunked`) cuts inside a sequence: a multiple of the budget falls strictly
    inside it. In blocks, so that the temporaries stay small whatever the batch."""
    start = 0
    for low in range(0, len(lengths), block):
        part = lengths[low:low + block]
        ends = start + np.cumsum(part, dtype=np.int64)                    # [b]
        if (((ends - 1) // budget > (ends - part) // budget) & (part > 0)).any():
            return True
        start = int(ends[-1])
    return False


def schedule_size(grid: Grid, workload: WorkloadConfig, lengths: np.ndarray,
                  backend: str = "cupy") -> ScheduleSize:
    """:class:`ScheduleSize` of ``grid``'s rank for a batch of ``lengths`` real tokens per
    sequence [B]: O(B) arithmetic, no micro-batch built."""
    lengths = np.asarray(lengths, dtype=np.int64)
    choice = chunk_choice(grid.model, grid.layout, workload, lengths, backend)
    grids = _group_grids(grid)
    per_rank = [_rank_lengths(g, lengths) for g in grids]
    mine = per_rank[grid.group_rank]
    if choice.tokens is None:
        count = workload.micro_batches or 1
        groups = np.stack([_group_tokens(l, count) for l in per_rank])      # [g, count]
        stage = groups[0] if grid.layout.tp > 1 else groups.sum(axis=0)
        return ScheduleSize(choice, count, int(groups[grid.group_rank].max()),
                            int(stage.max()), False)
    budget = choice.tokens
    totals = [int(l.sum()) for l in per_rank]
    count = max(1, max(-(-t // budget) for t in totals))
    firsts = [min(budget, t) for t in totals]                # each rank's first micro-batch
    stage = firsts[0] if grid.layout.tp > 1 else sum(firsts)
    return ScheduleSize(choice, count, firsts[grid.group_rank], stage,
                        _splits_a_sequence(mine, budget))


@functools.lru_cache(maxsize=256)
def _stage_schedule(layout: Layout, model: ModelConfig, stage: int, workload: WorkloadConfig,
                    lengths_bytes: bytes, backend: str):
    """(choice, each group rank's micro-batches, the stage's tokens per micro-batch):
    ``plan`` and ``--predict`` ask for every rank of large layouts, many times over."""
    lengths = np.frombuffer(lengths_bytes, dtype=np.int64)
    choice = chunk_choice(model, layout, workload, lengths, backend)
    count = workload.micro_batches or 1
    grids = _group_grids(Grid(layout, model, stage * layout.group))
    lists = tuple(rank_micro_batches(g, choice, lengths, count) for g in grids)
    total = max(1, max(len(s) for s in lists))
    if layout.tp > 1:
        stage_tokens = tuple(mb.n_tokens for mb in lists[0]) + (0,) * (total - len(lists[0]))
    else:
        stage_tokens = tuple(sum(s[m].n_tokens for s in lists if m < len(s))
                             for m in range(total))
    return choice, lists, stage_tokens


def overlap_pays(micro_batches: int, stages: int, group: int, backend: str = "cupy") -> bool:
    """Whether two micro-batches in flight can pay on a stage: there are two, the stage has
    several ranks (one alone exchanges nothing), and the pipeline is shallow enough for the
    longer fill. With two in flight at one per interval tau', each micro-batch spends 2 tau'
    in a stage (Little's law), so P stages fill in 2 (P-1) tau' instead of (P-1) tau; with
    tau' = r tau the overlap pays when M (1 - r) > (P - 1)(2r - 1). On a GPU, r = 0.8 (a
    quarter of a step communicating, four fifths of it hidden: the paper's EP layer,
    PREDICTIONS.md): M > 3 (P - 1). On NumPy the cores that compute also move the bytes,
    r is about 1, and only one stage (nothing to fill) pays: docs/PERFORMANCE.md measured
    it 1-20% faster at one stage and 10% slower at four."""
    if micro_batches < 2 or group < 2:
        return False
    if stages == 1:
        return True
    return backend != "numpy" and micro_batches > 3 * (stages - 1)


def overlap_enabled(setting: str, micro_batches: int, stages: int, group: int,
                    backend: str = "cupy") -> bool:
    """The workload's ``overlap`` setting applied: ``off``; ``on`` wherever two passes can
    be in flight (two micro-batches, several ranks in the stage); ``auto`` where it pays."""
    if setting == "off" or micro_batches < 2 or group < 2:
        return False
    return setting == "on" or overlap_pays(micro_batches, stages, group, backend)
