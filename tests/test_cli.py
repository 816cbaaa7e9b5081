"""The command line itself: the README's commands, the output file, and every bad input
giving one clear line on rank 0, a non-zero exit on every rank, no hang, no output file."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from spmd_moe.config import build_run_config
from spmd_moe.data import synthetic_input
from spmd_moe.testing import check_against_reference, reference_for

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
TIMEOUT = 120


def spmd_moe(*args, ranks=1, env=None, per_rank_status=False):
    """Run the CLI (under mpiexec when ranks > 1); with ``per_rank_status`` every rank
    prints its own exit status as ``rank-exit N`` on stderr."""
    command = [sys.executable, "-m", "spmd_moe", *args]
    if per_rank_status:
        quoted = " ".join(f"'{a}'" for a in command)
        command = ["sh", "-c", f'{quoted}; s=$?; echo "rank-exit $s" >&2; exit $s']
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, **(env or {})})


def test_run_tiny_writes_outputs_that_match_the_reference(tmp_path):
    out, report = tmp_path / "out.npz", tmp_path / "report.json"
    result = spmd_moe("run", "--preset", "tiny", "--output", str(out), "--report",
                      str(report), "--iters", "2", ranks=4)
    assert result.returncode == 0, result.stderr
    config = build_run_config("tiny")
    batch = synthetic_input(config.workload, config.model, config.seed)
    with np.load(out) as outputs:
        check_against_reference(dict(outputs), reference_for(config, batch), "bfloat16")
    data = json.loads(report.read_text())
    assert data["layout"] == "ep=4,pp=1" and data["world_size"] == 4
    assert data["tokens"] == 55 and data["iterations"] == 2 and data["tokens_per_s"] > 0
    for phase in ("attention", "router", "permute", "count_exchange", "dispatch", "experts",
                  "combine", "unpermute", "residual"):
        assert data["phases_ms"][phase]["max"] >= data["phases_ms"][phase]["mean"] > 0
    assert data["bytes_sent_per_rank"]["by_phase"]["dispatch"]["max"] > 0
    assert len(data["expert_load"]) == 5 and data["mfu"] > 0
    assert "tokens/s" in result.stdout and "experts" in result.stdout


def test_decode_from_an_input_file(tmp_path):
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.savez(tmp_path / "in.npz", ids=ids, mask=mask)
    out = tmp_path / "out.npz"
    result = spmd_moe("run", "--preset", "tiny", "--dtype", "float32", "--input",
                      str(tmp_path / "in.npz"), "--workload", "decode", "--new-tokens", "3",
                      "--output", str(out), ranks=2)
    assert result.returncode == 0, result.stderr
    from spmd_moe.reference import reference_forward, reference_generate

    model = build_run_config("tiny", sets=["dtype=float32"]).model
    with np.load(out) as outputs:
        assert np.array_equal(outputs["tokens"], reference_generate(model, ids, mask, 3))
        # hidden, logits and counts are those of the prompts' prefill.
        check_against_reference(dict(outputs), reference_forward(model, ids, mask), "float32")
    assert "per token" in result.stdout


def test_plan_paper_16_ranks():
    result = spmd_moe("plan", "--preset", "paper", "--world-size", "16")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "ep=16,pp=1 on 16 ranks" in text and "fits: yes" in text
    assert "dispatch 1228.8 MB" in text        # 80000 tokens x 2 x 15/16 x 8 KiB
    lines = [l for l in text.splitlines() if l.strip().startswith(("0 ", "15 "))]
    assert len(lines) == 2 and "964.04" in lines[0]   # 16 layers x 60.25 TFLOP


def test_plan_paper_baseline_fits_with_the_default_chunks():
    """Whole-sequence micro-batches (one per stage) need over 80 GiB per rank (123.7 GiB
    before chunks existed); the default chunks bound activations by the chunk: the paper's
    baseline plans with defaults."""
    result = spmd_moe("plan", "--preset", "paper-baseline", "--world-size", "16", "--layout",
                      "tp=8,pp=2")
    assert result.returncode == 0, result.stderr
    assert "fits: yes" in result.stdout
    assert "chunks of <= 16384 tokens per rank (default" in result.stdout
    assert "79 micro-batch(es) per rank, two in flight" in result.stdout
    whole = spmd_moe("plan", "--preset", "paper-baseline", "--world-size", "16", "--layout",
                     "tp=8,pp=2", "--micro-batches", "2")
    assert whole.returncode == 2 and "rank 8 needs" in whole.stderr


def test_run_prints_the_schedule_and_the_overlap(tmp_path):
    report = tmp_path / "r.json"
    result = spmd_moe("run", "--preset", "tiny", "--layout", "ep=2,pp=2", "--chunk-tokens",
                      "5", "--report", str(report), ranks=4)
    assert result.returncode == 0, result.stderr
    assert "prefill: chunks of <= 5 tokens (chunk_tokens)" in result.stdout
    assert "measured idle per stage" in result.stdout and "hidden" in result.stdout
    data = json.loads(report.read_text())
    assert data["pipeline"]["micro_batches"] == 7          # ceil(3 sequences x 11 / 5)
    assert data["config"]["workload"]["chunk_tokens"] == 5
    # NumPy: two in flight pay only without a pipeline to fill (overlap.overlap_pays).
    assert not data["overlap"]["enabled"] and "do not pay" in data["overlap"]["reason"]
    one_stage = spmd_moe("run", "--preset", "tiny", "--layout", "ep=4", "--chunk-tokens", "5",
                         ranks=4)
    assert one_stage.returncode == 0 and "overlap: two micro-batches in flight" in \
        one_stage.stdout
    off = spmd_moe("run", "--preset", "tiny", "--layout", "ep=4", "--chunk-tokens", "5",
                   "--no-overlap", ranks=4)
    assert off.returncode == 0 and "overlap: off: --no-overlap" in off.stdout


def test_plan_refuses_what_does_not_fit():
    result = spmd_moe("plan", "--preset", "paper", "--world-size", "2")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "needs" in result.stderr and "GiB" in result.stderr


def test_info():
    result = spmd_moe("info", "--backend", "numpy", ranks=2)
    assert result.returncode == 0, result.stderr
    assert "CUDA-aware" in result.stdout and "backend:       numpy" in result.stdout
    assert "rank 1" in result.stdout


BAD_INPUTS = {
    "n_experts not divisible by ep": (["--set", "n_experts=5"], "layout: ep=2 must divide"),
    "world size is not pp*ep": (["--layout", "ep=3"], "needs pp*ep = 3 ranks but the world"),
    "d_model not divisible by heads": (["--set", "n_heads=5"], "d_model: 32 must be divisible"),
    "unknown setting": (["--set", "colour=red"], "colour: unknown setting"),
    "unknown preset": (["--preset", "huge"], "preset: 'huge' is not one of"),
    "bad backend": (["--backend", "tpu"], "backend: 'tpu' is not one of"),
    "mpi-cuda without a GPU": (["--transport", "mpi-cuda"], "transport: mpi-cuda needs the"),
    "not enough memory": (["--memory-limit", "0.00001"], "layout: rank 0 needs"),
    "bad iters": (["--iters", "0"], "--iters: 0 must be >= 1"),
    "bad argument": (["--frobnicate"], "arguments: unrecognized arguments"),
    "output directory missing": (["--output", "/nonexistent/dir/out.npz"],
                                 "--output: directory /nonexistent/dir does not exist"),
    "missing input file": (["--input", "/nonexistent.npz"], "--input: cannot read"),
    "negative chunk": (["--chunk-tokens", "-3"], "chunk_tokens: -3 must be an integer >= 0"),
    "chunks and whole micro-batches": (["--chunk-tokens", "4", "--micro-batches", "2"],
                                       "chunk_tokens: 4 chunk tokens and micro_batches=2"),
    "overlap not a setting": (["--set", "overlap=maybe"], "overlap: 'maybe' is not one of"),
    "overlap both ways": (["--overlap", "--no-overlap"], "arguments: argument --no-overlap"),
}


def write_input(tmp_path, **arrays):
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)
    return ["--input", str(path)]


BAD_FILES = {
    "id out of range": (dict(ids=np.array([[1, 2, 500]])), "input ids: token id 500"),
    "sequence with no real token": (dict(ids=np.ones((2, 3), int),
                                         mask=np.array([[1, 1, 1], [0, 0, 0]])),
                                    "input mask: sequence 1 has no real token"),
    "wrong shape": (dict(ids=np.arange(4)), "input ids: must be a 2-D"),
    "wrong dtype": (dict(ids=np.ones((2, 2), np.float32)), "input ids: must be integers"),
    "right padding": (dict(ids=np.ones((1, 3), int), mask=np.array([[1, 1, 0]])),
                      "input mask: sequence 0 is not left-padded"),
    "prompt too long for decode": (dict(ids=np.ones((1, 60), int)),
                                   "input ids: sequence 0 has 60 real tokens + new_tokens 10"),
}


def check_refused(result, message, out):
    errors = [l for l in result.stderr.splitlines() if l.startswith("spmd-moe: error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    statuses = [l for l in result.stderr.splitlines() if l.startswith("rank-exit")]
    assert statuses == ["rank-exit 2"] * 2, result.stderr
    assert result.returncode != 0
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_on_every_rank(case, tmp_path):
    args, message = BAD_INPUTS[case]
    out = tmp_path / "out.npz"
    if "--output" not in args:
        args = [*args, "--output", str(out)]
    result = spmd_moe("run", "--preset", "tiny", *args, ranks=2, per_rank_status=True)
    check_refused(result, message, out)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_file_is_refused_on_every_rank(case, tmp_path):
    arrays, message = BAD_FILES[case]
    out = tmp_path / "out.npz"
    extra = ["--workload", "decode", "--new-tokens", "10"] if "decode" in case else []
    result = spmd_moe("run", "--preset", "tiny", *write_input(tmp_path, **arrays), *extra,
                      "--output", str(out), ranks=2, per_rank_status=True)
    check_refused(result, message, out)


def test_a_rank_failing_mid_run_brings_the_job_down(tmp_path):
    out = tmp_path / "out.npz"
    result = spmd_moe("run", "--preset", "tiny", "--output", str(out), ranks=3,
                      env={"SPMD_MOE_FAULT": "1:1"})
    assert result.returncode != 0
    assert "injected fault (SPMD_MOE_FAULT) on rank 1 at layer 1" in result.stderr
    assert not out.exists()


def test_plan_decode_step_floor():
    result = spmd_moe("plan", "--preset", "paper", "--world-size", "16", "--workload",
                      "decode", "--new-tokens", "16", "--hbm-gbps", "3000")
    assert result.returncode == 0, result.stderr
    # 16 layers x 8 sequences x 10016 tokens x 4096 x (K, V) x 2 bytes = 21.01 GB.
    assert "kv_cache 21.01" in result.stdout and "at 3000 GB/s" in result.stdout
