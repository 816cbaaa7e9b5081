"""The prefill schedule (chunks.py): chunks cover every real token once and in order, no
micro-batch holds more than the budget, every rank of a stage gets the same count, and the
default chunk size follows its arithmetic (docs/ARCHITECTURE.md)."""
import numpy as np
import pytest

from spmd_moe.core.chunks import (MAX_CHUNK_TOKENS, _splits_a_sequence, chunk_choice, chunked,
                                  default_chunk_tokens, prefill_schedule, schedule_size,
                                  whole_sequences)
from spmd_moe.core.config import Layout, WorkloadConfig, build_run_config
from spmd_moe.core.topology import Grid

PAPER = build_run_config("paper")
TINY = build_run_config("tiny")


def stream(micro_batches):
    """(sequence, position) of every token, in the order the micro-batches hold them."""
    return [(int(s), int(a) + i) for mb in micro_batches
            for s, a, n in zip(mb.seqs, mb.starts, mb.lengths) for i in range(int(n))]


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 7, 100])
def test_chunks_cover_every_token_once_in_order_within_the_budget(budget):
    lengths = np.array([4, 1, 9, 3, 6, 2])
    seqs = range(1, 5)                                      # a rank's block: sequences 1-4
    micro = chunked(seqs, lengths, budget)
    want = [(s, p) for s in seqs for p in range(lengths[s])]
    assert stream(micro) == want
    total = int(lengths[1:5].sum())
    assert len(micro) == -(-total // budget)
    for mb in micro:
        assert 0 < mb.n_tokens <= budget
        assert len(set(mb.seqs.tolist())) == len(mb.seqs)    # one chunk per sequence
        assert (mb.lengths >= 1).all() and (mb.lengths <= budget).all()
        assert np.array_equal(mb.ends, mb.starts + mb.lengths == lengths[mb.seqs])
    assert all(mb.n_tokens == budget for mb in micro[:-1])   # packed full but the last


def test_a_budget_larger_than_the_rank_is_one_micro_batch_of_whole_sequences():
    lengths = np.array([5, 3, 7])
    (mb,) = chunked(range(3), lengths, 1000)
    assert mb.seqs.tolist() == [0, 1, 2] and mb.starts.tolist() == [0, 0, 0]
    assert mb.lengths.tolist() == [5, 3, 7] and mb.ends.all()
    assert chunked(range(2, 2), lengths, 4) == []


def test_whole_sequence_groups_are_the_grids():
    lengths = np.arange(1, 11)
    grid = Grid(Layout(ep=3, tp=1, pp=2), TINY.model, 4)
    groups = whole_sequences(grid.sequences(10), lengths, 3)
    assert [mb.seqs.tolist() for mb in groups] == [list(r) for r in grid.micro_batches(10, 3)]
    assert all(mb.ends.all() and not mb.starts.any() for mb in groups)


@pytest.mark.parametrize("layout,world", [("ep=3,pp=2", 6), ("tp=2,pp=2", 4), ("ep=4", 4)])
def test_a_stage_agrees_on_the_count_and_covers_the_batch(layout, world):
    """Ranks with fewer chunks get empty micro-batches: collectives pair up."""
    lengths = np.array([7, 1, 11, 4, 2, 9, 3])
    work = WorkloadConfig(batch_size=7, seq_len=11, chunk_tokens=3)
    parsed = Layout.parse(layout, world)
    schedules = [prefill_schedule(Grid(parsed, TINY.model, r), work, lengths, "numpy")
                 for r in range(world)]
    for stage in range(parsed.pp):
        mine = schedules[stage * parsed.group:(stage + 1) * parsed.group]
        assert len({s.count for s in mine}) == 1
        tokens = [t for s in mine for t in stream(s.micro_batches)]
        if parsed.tp > 1:
            assert all(stream(s.micro_batches) == stream(mine[0].micro_batches) for s in mine)
            tokens = stream(mine[0].micro_batches)
        assert sorted(tokens) == [(s, p) for s in range(7) for p in range(lengths[s])]
        assert mine[0].stage_tokens == [
            sum(s.micro_batches[m].n_tokens for s in (mine[:1] if parsed.tp > 1 else mine))
            for m in range(mine[0].count)]
    assert any(s.splits_sequences for s in schedules)


@pytest.mark.parametrize("layout,world", [("ep=3,pp=2", 6), ("tp=2,pp=2", 4), ("ep=4", 4),
                                          ("ep=2", 2)])
@pytest.mark.parametrize("sets", [dict(chunk_tokens=1), dict(chunk_tokens=3),
                                  dict(chunk_tokens=8), dict(chunk_tokens=1000),
                                  dict(micro_batches=1), dict(micro_batches=3),
                                  dict(micro_batches=7), {}])
def test_the_memory_checks_schedule_size_is_the_schedules(layout, world, sets):
    """schedule_size (the memory check's arithmetic, nothing built) gives what the engine's
    schedule holds: count, largest micro-batch of the rank and of the stage, split
    sequences; including ranks with fewer sequences than micro-batches."""
    rng = np.random.default_rng(len(layout) * 31 + sum(sets.values()))
    parsed = Layout.parse(layout, world)
    for batch in (7, 3, 1):
        lengths = rng.integers(1, 12, batch)
        work = WorkloadConfig(batch_size=batch, seq_len=11, **sets)
        for rank in range(world):
            grid = Grid(parsed, TINY.model, rank)
            full = prefill_schedule(grid, work, lengths, "numpy")
            size = schedule_size(grid, work, lengths, "numpy")
            assert (size.chunk, size.count, size.largest_tokens, size.largest_stage_tokens,
                    size.splits_sequences) == (full.chunk, full.count, full.largest_tokens,
                                               max(full.stage_tokens), full.splits_sequences)


def test_a_split_sequence_is_found_across_blocks():
    lengths = np.full(10, 4)
    assert not _splits_a_sequence(lengths, 8, block=3)      # cuts fall between sequences
    assert _splits_a_sequence(lengths, 6, block=3)          # 6 falls inside the second
    assert not _splits_a_sequence(lengths, 4, block=3)
    lengths[7] = 5                                  # tokens 28-32: 32 is cut, in block 3
    assert _splits_a_sequence(lengths, 4, block=3)


def test_micro_batches_set_means_whole_sequences():
    lengths = np.full(6, 5)
    work = WorkloadConfig(batch_size=6, seq_len=5, micro_batches=4)
    schedule = prefill_schedule(Grid(Layout(ep=2, tp=1, pp=1), TINY.model, 0), work, lengths)
    assert schedule.chunk.tokens is None and schedule.count == 4
    assert not schedule.splits_sequences
    assert [mb.seqs.tolist() for mb in schedule.micro_batches] == [[0], [1], [2], []]


def test_default_chunk_arithmetic_at_paper_scale():
    lengths = np.full(128, 10000)
    # 16 stages: 9 x 15 = 135 micro-batches of a rank's 80,000 tokens -> 592 tokens each
    # (above the GEMM floor 1024 rows x 16 experts / (2 x 16 ranks) = 512).
    one_expert = default_chunk_tokens(PAPER.model, Layout(ep=16, tp=1, pp=16), lengths)
    assert one_expert.tokens == 592 and "bubble target" in one_expert.reason
    assert 80000 / 592 >= 135
    # One stage: two in flight would take 40,000; the cap bounds activations.
    assert default_chunk_tokens(PAPER.model, Layout(ep=16, tp=1, pp=1), lengths).tokens \
        == MAX_CHUNK_TOKENS
    # TP: every rank holds all 1.28M tokens; the GEMM floor is 1024 x 16 / 2 = 8192.
    baseline = default_chunk_tokens(PAPER.model, Layout(ep=1, tp=8, pp=2), lengths)
    assert baseline.tokens == MAX_CHUNK_TOKENS and "8192" in baseline.reason


def test_default_chunk_gemm_floor_when_the_batch_is_small():
    lengths = np.full(5, 11)
    layout = Layout(ep=2, tp=1, pp=2)
    gpu = default_chunk_tokens(TINY.model, layout, lengths, "cupy")
    cpu = default_chunk_tokens(TINY.model, layout, lengths, "numpy")
    assert gpu.tokens == 1024 * 12 // (2 * 2) and "GEMM floor" in gpu.reason
    assert cpu.tokens == 128 * 12 // (2 * 2)
    work = WorkloadConfig(batch_size=5, seq_len=11)
    assert chunk_choice(TINY.model, layout, work, lengths, "numpy") == cpu
    given = WorkloadConfig(batch_size=5, seq_len=11, chunk_tokens=3)
    assert chunk_choice(TINY.model, layout, given, lengths).tokens == 3


@pytest.mark.parametrize("ep, lengths, busiest", [
    (2, [10, 10, 3000, 3000], 6000),          # rank 1 holds 6000 tokens, rank 0 twenty
    (3, [5, 5, 5, 5, 4000, 4000], 8000),      # the last rank of the stage
])
def test_the_default_chunk_counts_the_busiest_rank_of_the_stage(ep, lengths, busiest):
    """Issue #22: a mutation counting only rank 0's tokens survived the suite. One stage
    wants two micro-batches of the busiest rank's tokens (not rank 0's, whose 20 or 10
    would leave the GEMM floor, 128 x 12 / (2 x ep), in charge)."""
    for pp in (1, 2):
        choice = default_chunk_tokens(TINY.model, Layout(ep=ep, tp=1, pp=pp),
                                      np.array(lengths), "numpy")
        target = 2 if pp == 1 else 9
        assert choice.tokens == busiest // target
        assert f"of the {busiest} tokens a rank holds" in choice.reason
