"""The compare API (``compare.run_compare``) at 2, 3 and 4 ranks (``mpiexec -n N python -m
pytest --with-mpi tests/mpi``): both deployments run in one job on the same batch, their
outputs agree with each other and with the single-process reference, both reports are
there, and a layout that cannot work is refused on every rank before anything runs."""
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.commands.compare import (RunOptions, default_baseline_layout, default_ep_layout,
                                       run_compare)
from spmd_moe.core.config import build_run_config
from spmd_moe.core.errors import LayoutError
from spmd_moe.engine.testing import check_against_reference, reference_for
from spmd_moe.model.inputs import synthetic_input

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
NUMPY = RunOptions(backend="numpy")


@pytest.fixture
def halves(monkeypatch):
    """Each deployment's outputs (rank 0), as run_compare runs them: the comparison of the
    two halves is checked by the tests, each half against the reference here."""
    from spmd_moe.commands import compare

    captured = []
    original = compare.run_deployment

    def run_deployment(*args, **kwargs):
        outputs, report = original(*args, **kwargs)
        captured.append(outputs)
        return outputs, report

    monkeypatch.setattr(compare, "run_deployment", run_deployment)
    return captured


def check_halves(halves, config, batch, dtype="float32", new_tokens=0):
    """Both deployments' outputs against the single-process reference (rank 0)."""
    if RANK != 0:
        return
    assert len(halves) == 2
    reference = reference_for(config, batch)
    for outputs in halves:
        check_against_reference(outputs, reference, dtype)
        if new_tokens:
            from spmd_moe.model.reference import reference_generate

            want = reference_generate(config.model, batch.ids, batch.mask, new_tokens,
                                      config.seed)
            assert np.array_equal(outputs["tokens"], want)


def setup(*sets):
    # Left padding and 5 sequences over the ranks: uneven shares on purpose.
    config = build_run_config("tiny", sets=["dtype=float32", "pad_fraction=0.3",
                                            "batch_size=5", "seq_len=9", *sets])
    return config, synthetic_input(config.workload, config.model, config.seed)


@pytest.mark.mpi(min_size=2)
def test_default_deployments_agree_with_each_other_and_the_reference(halves):
    config, batch = setup()
    result = run_compare(config, WORLD, batch, options=NUMPY)
    check_halves(halves, config, batch)
    if RANK != 0:
        assert result is None
        return
    comparison = result["comparison"]
    assert comparison["ep_layout"] == str(default_ep_layout(config.model, SIZE))
    baseline = default_baseline_layout(config.model, SIZE)
    assert comparison["baseline_layout"] == f"tp={baseline.tp},pp={baseline.pp}"
    out = comparison["outputs"]
    assert out["agree"] and out["expert_counts_identical"], out
    assert out["logits_rel_err"] < 1e-4 and out["hidden_rel_err"] < 1e-4
    assert result["ep"]["world_size"] == result["baseline"]["world_size"] == SIZE
    assert result["ep"]["tokens"] == result["baseline"]["tokens"] == batch.n_tokens
    assert comparison["ratio_ep_over_baseline"] > 0


@pytest.mark.mpi(min_size=2)
def test_explicit_pipelined_ep_layout(halves):
    """A pipelined EP layout (micro-batches that do not divide the batch) against the
    default baseline."""
    config, batch = setup("n_layers=4")
    ep = "ep=2,pp=2" if SIZE == 4 else f"ep=1,pp={SIZE}"
    result = run_compare(config, WORLD, batch, ep_layout=ep, options=NUMPY)
    check_halves(halves, config, batch)
    if RANK == 0:
        assert result["comparison"]["ep_layout"] == ep
        assert result["comparison"]["outputs"]["agree"]
        assert result["ep"]["pipeline"]["stages"] == (2 if SIZE == 4 else SIZE)


@pytest.mark.mpi(min_size=2)
def test_bfloat16_compare_reports_numbers(halves):
    config, batch = setup("dtype=bfloat16")
    result = run_compare(config, WORLD, batch, options=NUMPY)
    check_halves(halves, config, batch, "bfloat16")
    if RANK == 0:
        out = result["comparison"]["outputs"]
        assert out["dtype"] == "bfloat16" and out["agree"], out
        assert np.isfinite(out["logits_rel_err"]) and out["logits_rel_err"] < 2e-2


@pytest.mark.mpi(min_size=2)
def test_decode_tokens_identical(halves):
    config, batch = setup("workload=decode", "new_tokens=3")
    result = run_compare(config, WORLD, batch, options=NUMPY)
    check_halves(halves, config, batch, new_tokens=3)
    if RANK == 0:
        out = result["comparison"]["outputs"]
        assert out["tokens_identical_fraction"] == 1.0 and out["agree"]
        assert result["comparison"]["decode"]["ep_tokens_per_s"] > 0


@pytest.mark.mpi(min_size=2)
def test_refused_on_every_rank_before_running():
    config, batch = setup()
    with pytest.raises(LayoutError, match="--ep-layout"):
        run_compare(config, WORLD, batch, ep_layout=f"tp={SIZE}", options=NUMPY)
    with pytest.raises(LayoutError, match="layout"):
        run_compare(config, WORLD, batch, baseline_layout=f"tp={2 * SIZE}", options=NUMPY)
    # Still in step: the next collective pairs up.
    assert WORLD.allreduce(1) == SIZE


@pytest.mark.mpi(min_size=2)
def test_a_deployment_matches_the_reference():
    """run_deployment (each half of a comparison) gives the single-process reference's
    outputs, so agreement between the two halves means both are right."""
    config, batch = setup()
    from spmd_moe.commands.compare import run_deployment

    ep = default_ep_layout(config.model, SIZE)
    outputs, report = run_deployment(config, WORLD, batch, ep, NUMPY)
    if RANK == 0:
        check_against_reference(outputs, reference_for(config, batch), "float32")
        assert report["layout"] == str(ep)
