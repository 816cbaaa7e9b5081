"""``spmd-moe compare``: the default layouts for a world size, the output checks, and the
command itself under mpiexec (matching outputs, both reports, one-line refusals)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from spmd_moe.commands.compare import (compare_outputs, default_baseline_layout, default_ep_layout,
                                       format_comparison, layout_name, resolve_layouts)
from spmd_moe.core.config import Layout, build_run_config
from spmd_moe.core.errors import LayoutError

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
TIMEOUT = 300


def model(*sets):
    return build_run_config("tiny", sets=list(sets)).model


# --- layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("world,ep,baseline", [
    (1, "ep=1,pp=1", "tp=1,pp=1"),
    (2, "ep=2,pp=1", "tp=2,pp=1"),
    (3, "ep=3,pp=1", "tp=1,pp=3"),      # 3 divides E=12 but neither H=4 nor F=40
    (4, "ep=4,pp=1", "tp=4,pp=1"),
    (8, "ep=4,pp=2", "tp=4,pp=2"),      # 8 divides neither E=12 nor F=40
    (16, "ep=4,pp=4", "tp=4,pp=4"),     # needs n_layers >= 4
])
def test_default_layouts(world, ep, baseline):
    m = model("n_layers=4")
    assert str(default_ep_layout(m, world)) == ep
    assert layout_name(default_baseline_layout(m, world), True) == baseline


def test_paper_defaults_at_16_ranks():
    paper = build_run_config("paper").model
    assert str(default_ep_layout(paper, 16)) == "ep=16,pp=1"
    assert str(default_baseline_layout(paper, 16)) == "tp=16,pp=1"
    ep, baseline = resolve_layouts(paper, 16, None, "tp=8,pp=2")
    assert str(baseline) == "tp=8,pp=2"


def test_world_sizes_no_layout_fits_are_refused_naming_the_constraints():
    with pytest.raises(LayoutError, match=r"^--ep-layout: no expert-parallel layout fits 16 "
                                          r"ranks.*n_experts=12.*n_layers=3"):
        default_ep_layout(model("n_layers=3"), 16)
    with pytest.raises(LayoutError, match=r"^--baseline-layout: no tensor-parallel baseline "
                                          r"fits 2 ranks"):
        default_baseline_layout(model("n_layers=1", "d_ff=41"), 2)


def test_explicit_layouts_are_checked():
    m = model()
    with pytest.raises(LayoutError, match="--ep-layout.*tensor parallel"):
        resolve_layouts(m, 4, "tp=4", None)
    with pytest.raises(LayoutError, match="--baseline-layout.*expert parallel"):
        resolve_layouts(m, 4, None, "ep=4")
    with pytest.raises(LayoutError, match="layout"):
        resolve_layouts(m, 4, "ep=8", None)
    ep, baseline = resolve_layouts(m, 4, "ep=2,pp=2", "tp=2,pp=2")
    assert (ep, baseline) == (Layout(2, 1, 2), Layout(1, 2, 2))


# --- output checks -----------------------------------------------------------------------

def outputs(rng, counts=None):
    return {"logits": rng.standard_normal((3, 7)).astype(np.float32),
            "hidden": rng.standard_normal((3, 5, 4)).astype(np.float32),
            "expert_counts": counts if counts is not None else np.arange(6).reshape(2, 3)}


def test_float32_outputs_must_match_closely_and_route_identically():
    a = outputs(np.random.default_rng(0))
    same = {k: v.copy() for k, v in a.items()}
    same["logits"] = same["logits"] * (1 + 1e-7)
    result = compare_outputs(same, a, "float32")
    assert result["agree"] and result["expert_counts_identical"]
    assert 0 < result["logits_rel_err"] < 1e-6 and result["hidden_rel_err"] == 0
    moved = {**same, "expert_counts": a["expert_counts"] + np.eye(2, 3, dtype=int)}
    result = compare_outputs(moved, a, "float32")
    assert not result["agree"] and result["expert_counts_differing"] == 2
    far = {**same, "logits": a["logits"] * 1.01}
    assert not compare_outputs(far, a, "float32")["agree"]


def test_bfloat16_reports_count_differences_without_failing():
    a = outputs(np.random.default_rng(0))
    near = {**a, "logits": a["logits"] * 1.005,
            "expert_counts": a["expert_counts"] + np.eye(2, 3, dtype=int)}
    result = compare_outputs(near, a, "bfloat16")
    assert result["agree"] and result["expert_counts_differing"] == 2
    assert not compare_outputs({**near, "logits": a["logits"] * 1.1}, a, "bfloat16")["agree"]


def test_decode_tokens_are_compared():
    a = outputs(np.random.default_rng(0))
    a["tokens"] = np.array([[1, 2], [3, 4], [5, 6]])
    b = {**a, "tokens": np.array([[1, 2], [3, 4], [5, 7]])}
    result = compare_outputs(b, a, "float32")
    assert result["tokens_identical_fraction"] == pytest.approx(5 / 6) and not result["agree"]


# --- the command under mpiexec -------------------------------------------------------------

def check_routing_against_reference(data, *sets):
    """Both deployments' per-layer expert load (max and mean over experts of the real rows
    routed, float32) is the single-process reference's: the command's two halves are held
    to the reference, not only to each other."""
    from spmd_moe.model.inputs import synthetic_input
    from spmd_moe.model.reference import reference_forward

    config = build_run_config("tiny", sets=list(sets))
    batch = synthetic_input(config.workload, config.model, config.seed)
    counts = reference_forward(config.model, batch.ids, batch.mask,
                               config.seed)["expert_counts"]
    for key in ("ep", "baseline"):
        load = data[key]["expert_load"]
        assert [row["max"] for row in load] == counts.max(axis=1).tolist(), key
        assert [row["mean"] for row in load] == pytest.approx(counts.mean(axis=1).tolist())


def compare_cli(*args, ranks=4, per_rank_status=False):
    command = [sys.executable, "-m", "spmd_moe", "compare", *args]
    if per_rank_status:
        quoted = " ".join(f"'{a}'" for a in command)
        command = ["sh", "-c", f'{quoted}; s=$?; echo "rank-exit $s" >&2; exit $s']
    return subprocess.run([MPIEXEC, "-n", str(ranks), *command], capture_output=True,
                          text=True, timeout=TIMEOUT)


def test_compare_at_four_ranks_float32(tmp_path):
    path = tmp_path / "compare.json"
    result = compare_cli("--preset", "tiny", "--set", "dtype=float32", "--report", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(path.read_text())
    comparison = data["comparison"]
    assert data["world_size"] == 4
    assert data["ep"]["layout"] == "ep=4,pp=1" and data["baseline"]["layout"] == "tp=4,pp=1"
    for key in ("ep", "baseline"):
        report = data[key]
        assert report["tokens"] == 55 and report["tokens_per_s"] > 0
        assert report["config"]["model"]["dtype"] == "float32"
    assert "dispatch" in data["ep"]["phases_ms"] and "attn_allreduce" in data["baseline"][
        "phases_ms"]
    out = comparison["outputs"]
    assert out["agree"] and out["expert_counts_identical"]
    assert out["logits_rel_err"] < 1e-4 and out["hidden_rel_err"] < 1e-4
    assert comparison["ratio_ep_over_baseline"] == pytest.approx(
        data["ep"]["tokens_per_s"] / data["baseline"]["tokens_per_s"])
    assert set(comparison["phases_max_ms"]["dispatch"]) == {"ep_ms", "baseline_ms"}
    # The table on stdout: both deployments, the ratio and the output check.
    assert "ratio EP/baseline" in result.stdout and "outputs: agree" in result.stdout
    assert "ep=4,pp=1" in result.stdout and "tp=4,pp=1" in result.stdout
    assert result.stdout.count("spmd-moe compare:") == 1        # rank 0 only
    check_routing_against_reference(data, "dtype=float32")


def test_compare_pipelined_layouts_and_decode(tmp_path):
    path = tmp_path / "compare.json"
    result = compare_cli("--preset", "tiny", "--set", "dtype=float32", "--set", "n_layers=4",
                         "--ep-layout", "ep=2,pp=2", "--baseline-layout", "tp=2,pp=2",
                         "--workload", "decode", "--new-tokens", "3", "--report", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(path.read_text())
    assert data["comparison"]["outputs"]["tokens_identical_fraction"] == 1.0
    assert data["comparison"]["decode"]["ep_per_token_ms"] > 0
    assert data["ep"]["pipeline"]["stages"] == 2
    check_routing_against_reference(data, "dtype=float32", "n_layers=4")


@pytest.mark.slow
def test_compare_at_sixteen_ranks(tmp_path):
    """16 ranks on a laptop or CI (oversubscribed): ep=4,pp=4 against tp=4,pp=4 (tiny needs
    at least 4 layers for either)."""
    path = tmp_path / "compare.json"
    result = compare_cli("--preset", "tiny", "--set", "n_layers=5", "--set", "dtype=float32",
                         "--report", str(path), ranks=16)
    assert result.returncode == 0, result.stderr
    comparison = json.loads(path.read_text())["comparison"]
    assert comparison["ep_layout"] == "ep=4,pp=4"
    assert comparison["baseline_layout"] == "tp=4,pp=4"
    assert comparison["outputs"]["agree"] and comparison["outputs"]["expert_counts_identical"]
    check_routing_against_reference(json.loads(path.read_text()), "n_layers=5",
                                    "dtype=float32")


@pytest.mark.parametrize("args,message", [
    (["--layout", "ep=4"], "spmd-moe: error: --layout: compare runs two layouts"),
    (["--set", "n_layers=1", "--set", "d_ff=41"],
     "spmd-moe: error: --baseline-layout: no tensor-parallel baseline fits 4 ranks"),
    (["--ep-layout", "ep=8"], "spmd-moe: error: layout: ep=8,pp=1 needs"),
])
def test_bad_inputs_one_line_on_rank_0_and_every_rank_exits_2(args, message):
    result = compare_cli("--preset", "tiny", *args, per_rank_status=True)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if not l.startswith("rank-exit")]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert result.stderr.count("rank-exit 2") == 4


def test_format_comparison_of_a_result():
    report = {"workload": "prefill", "batch_size": 2, "seq_len": 3, "tokens": 6,
              "backend": {"name": "numpy"}, "transport": {"name": "mpi-host"},
              "wall_s": 0.01, "tokens_per_s": 600.0,
              "pipeline": {"stages": 1, "micro_batches": 2, "chunk_tokens": 3,
                           "bubble_fraction_ideal": 0.0,
                           "stage_idle": [{"stage": 0, "idle_fraction": 0.05}]},
              "overlap": {"reason": "two micro-batches in flight",
                          "hidden_ms": {"mean": 0.5, "max": 0.7}},
              "phases_ms": {"attention": {"mean": 1.0, "max": 2.0}}}
    from spmd_moe.commands.compare import summarize

    out = compare_outputs(outputs(np.random.default_rng(0)), outputs(np.random.default_rng(0)),
                          "float32")
    summary = summarize(Layout(2, 1, 1), Layout(1, 2, 1), report, report, out)
    text = format_comparison({"world_size": 2, "ep": report, "baseline": report,
                              "comparison": summary})
    assert "ratio EP/baseline (tokens/s): 1.00x" in text and "attention" in text
    assert "chunks of <= 3 tokens, 1 stage(s) x 2 micro-batch(es)" in text
