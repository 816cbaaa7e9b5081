"""The run report (spmd_moe/commands/report.py) of a one-process run: what it counts is
what the run did, in the phase table's order, and the text table says the same."""
import json

import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.commands.report import build_report, format_report, report_json
from spmd_moe.core.config import build_run_config
from spmd_moe.core.phases import PHASES
from spmd_moe.engine.runner import open_session, run_prefill
from spmd_moe.model.inputs import synthetic_input


@pytest.fixture(scope="module")
def prefill():
    config = build_run_config("tiny", dtype="float32")
    batch = synthetic_input(config.workload, config.model, config.seed)
    session = open_session(config, MPI.COMM_SELF, batch, backend="numpy")
    result = run_prefill(session, batch, iters=2, collect=True)
    report = build_report(session, batch, result)
    session.close()
    return config, batch, result, report


def test_counts_are_the_run_s(prefill):
    config, batch, result, report = prefill
    assert report["tokens"] == batch.n_tokens == 5 * 11
    assert report["iterations"] == 2 and report["workload"] == "prefill"
    counts = np.array(report["expert_counts"])
    assert counts.shape == (5, 12) and (counts.sum(axis=1) == batch.n_tokens * 2).all()
    assert np.array_equal(counts, result.expert_counts)
    for layer, load in enumerate(report["expert_load"]):
        assert load["max"] == counts[layer].max()
        assert np.isclose(load["max_over_mean"], counts[layer].max() / counts[layer].mean())
    assert report["tokens_per_s"] == pytest.approx(report["tokens"] / report["wall_s"])


def test_phases_follow_the_one_table_and_the_text_says_them(prefill):
    *_, report = prefill
    names = list(report["phases_ms"])
    assert names == [p for p in PHASES if p in names] and "experts" in names
    assert all(report["phases_ms"][p]["max"] >= report["phases_ms"][p]["mean"] >= 0
               for p in names)
    text = format_report(report)
    assert all(name in text for name in names) and report["layout"] in text
    assert json.loads(report_json(report))["tokens"] == report["tokens"]
