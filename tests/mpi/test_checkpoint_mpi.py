"""Checkpoint families at 2, 3 and 4 ranks: every layout that fits (expert parallel, expert
parallel with pipeline stages, the tensor-parallel baseline) gives transformers' last-token
logits (float32, relative error < 1e-4) and its greedy tokens, each rank having read only its
share of the safetensors files.

Run under ``mpiexec -n N python -m pytest --with-mpi tests/mpi`` (bin/run-tests: N = 2, 3, 4).
The checkpoints are tests/data/hf's (bin/make-hf-fixtures); OLMoE's q/k norms under TP need
a sum over the ranks, Qwen3-MoE's K/V heads are replicated when tp exceeds them.
"""
import hf_fixtures as hf
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.core.config import Layout
from spmd_moe.core.errors import LayoutError
from spmd_moe.engine.runner import open_session, run_decode, run_prefill
from spmd_moe.engine.testing import relative_error
from spmd_moe.model.checkpoint import Checkpoint, checkpoint_run_config

WORLD = MPI.COMM_WORLD
SIZE = WORLD.Get_size()


def layouts(name: str, size: int) -> list[str]:
    """EP (all ranks one stage), EP x PP, pure pipeline, TP and TP x PP: those that fit."""
    model = checkpoint_run_config(hf.path(name)).model
    candidates = [f"ep={size},pp=1", f"ep={size // 2},pp=2", f"ep=1,pp={size}",
                  f"tp={size},pp=1", f"tp={size // 2},pp=2"]
    found = []
    for text in candidates:
        try:
            parsed = Layout.parse(text, size).validate(model, size)
        except LayoutError:
            continue
        if str(parsed) not in [str(Layout.parse(f, size)) for f in found]:
            found.append(text)
    return found


CASES = [(name, layout) for name in hf.FLOAT32 + hf.LOW_PRECISION
         for layout in layouts(name, SIZE)]


@pytest.mark.mpi(min_size=2)
def test_every_family_has_multi_rank_layouts_here():
    kinds = {layout.split("=")[0] for _, layout in CASES}
    assert "ep" in kinds
    if SIZE in (2, 4):
        assert "tp" in kinds and any("pp=2" in layout for _, layout in CASES)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name,layout", CASES)
def test_layout_matches_transformers(name, layout):
    dtype = "float32"
    config, batch, want, eos = hf.setup(name, dtype=dtype, decode=True)
    session = open_session(config, WORLD, batch, layout=layout, backend="numpy",
                           new_tokens=hf.NEW_TOKENS)
    try:
        prefill = run_prefill(session, batch)
        decode = run_decode(session, batch, hf.NEW_TOKENS, eos)
        read = WORLD.gather(session.load.bytes_read, root=0)
    finally:
        session.close()
    if WORLD.Get_rank() != 0:
        return
    logits, tokens = hf.float32_expected(name, want)
    assert relative_error(prefill.outputs["logits"], logits) < 1e-4
    assert np.array_equal(decode.outputs["tokens"], tokens), (decode.outputs["tokens"], tokens)
    whole = sum(e.end - e.begin for e in Checkpoint(hf.path(name)).tensors.values())
    # Each rank reads only its share: no rank reads the whole checkpoint when it is split.
    assert all(0 < r < whole for r in read), (read, whole)


@pytest.mark.mpi(min_size=2)
def test_compare_runs_a_checkpoint_in_both_deployments():
    from spmd_moe.commands.compare import run_compare

    config, batch, want, _ = hf.setup("olmoe")
    result = run_compare(config, WORLD, batch)
    if WORLD.Get_rank() != 0:
        assert result is None
        return
    outputs = result["comparison"]["outputs"]
    assert outputs["agree"] and outputs["expert_counts_identical"], outputs
    assert result["ep"]["weights"]["family"] == "olmoe"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name,layout", CASES)
def test_chunked_and_overlapped_run_matches_transformers(name, layout):
    """Chunks of 3 tokens (a prompt spans several, so each chunk reads its sequence's earlier
    keys from the stage's K/V-head cache), two micro-batches in flight wherever a stage has
    several ranks (OLMoE's whole-projection q/k norm under TP then sums over the group
    without blocking), decode after it: transformers' logits and greedy tokens."""
    from dataclasses import replace

    config, batch, want, eos = hf.setup(name, dtype="float32", decode=True)
    config = replace(config, workload=replace(config.workload, chunk_tokens=3, overlap="on"))
    session = open_session(config, WORLD, batch, layout=layout, backend="numpy",
                           new_tokens=hf.NEW_TOKENS)
    try:
        prefill = run_prefill(session, batch)
        decode = run_decode(session, batch, hf.NEW_TOKENS, eos)
        schedule = prefill.schedule
        overlapped = session.engine.overlaps(schedule.count)
        group = session.topo.layout.group
    finally:
        session.close()
    assert schedule.chunk.tokens == 3 and schedule.count > 1
    assert overlapped == (group > 1)
    assert WORLD.allreduce(int(schedule.splits_sequences)) > 0
    if WORLD.Get_rank() != 0:
        return
    logits, tokens = hf.float32_expected(name, want)
    assert relative_error(prefill.outputs["logits"], logits) < 1e-4
    assert np.array_equal(decode.outputs["tokens"], tokens), (decode.outputs["tokens"], tokens)
