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


# --- checkpoints: --model, export, generate --------------------------------------------

HF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf")


def test_run_model_with_an_input_file_gives_transformers_logits(tmp_path):
    with np.load(os.path.join(HF, "olmoe", "expected.npz")) as want:
        ids, mask, logits, tokens = want["ids"], want["mask"], want["logits"], want["tokens"]
    np.savez(tmp_path / "in.npz", ids=ids, mask=mask)
    out, report = tmp_path / "out.npz", tmp_path / "r.json"
    result = spmd_moe("run", "--model", os.path.join(HF, "olmoe"), "--input",
                      str(tmp_path / "in.npz"), "--workload", "decode", "--new-tokens", "6",
                      "--layout", "tp=2", "--output", str(out), "--report", str(report),
                      ranks=2)
    assert result.returncode == 0, result.stderr
    with np.load(out) as got:
        err = np.linalg.norm(got["logits"] - logits) / np.linalg.norm(logits)
        assert err < 1e-4 and np.array_equal(got["tokens"], tokens)
    weights = json.loads(report.read_text())["weights"]
    assert weights["family"] == "olmoe" and len(weights["bytes_read_per_rank"]) == 2
    assert all(b > 0 for b in weights["bytes_read_per_rank"])
    assert "weights: checkpoint" in result.stdout and "MB per rank" in result.stdout


def test_export_then_run_model_equals_the_preset(tmp_path):
    directory = tmp_path / "tiny-export"
    result = spmd_moe("export", "--preset", "tiny", str(directory), "--max-shard-size", "0.1")
    assert result.returncode == 0, result.stderr
    assert (directory / "model.safetensors.index.json").exists()
    outputs = []
    for source in (["--preset", "tiny"], ["--model", str(directory), "--set", "batch_size=5",
                                          "--set", "seq_len=11"]):
        out = tmp_path / f"out{len(outputs)}.npz"
        result = spmd_moe("run", *source, "--layout", "ep=2,pp=2", "--output", str(out),
                          ranks=4)
        assert result.returncode == 0, result.stderr
        with np.load(out) as data:
            outputs.append(dict(data))
    for key in ("hidden", "logits", "expert_counts"):
        assert np.array_equal(outputs[0][key], outputs[1][key]), key


def test_plan_reads_only_config_json(tmp_path):
    shutil.copy(os.path.join(HF, "..", "..", "..", "docs", "models", "mixtral-8x7b",
                             "config.json"), tmp_path)
    result = spmd_moe("plan", "--model", str(tmp_path), "--world-size", "8", "--set",
                      "batch_size=8", "--set", "seq_len=1024")
    assert result.returncode == 0, result.stderr
    assert "parameters: 46.70 B, 12.88 B active per token" in result.stdout
    assert "KV heads 8, head dim 128, swiglu experts" in result.stdout
    # ep=8: one Mixtral expert (3 x 4096 x 14336 bf16) of each of the 32 layers per rank.
    assert "fits: yes" in result.stdout


def copy_checkpoint(tmp_path, name):
    target = tmp_path / name
    shutil.copytree(os.path.join(HF, name), target)
    return target


BAD_CHECKPOINTS = {
    "missing tensor": ("olmoe", lambda d: _drop_tensor(d, "model.layers.1.mlp.gate.weight"),
                       "tensor model.layers.1.mlp.gate.weight: missing from model.safetensors"),
    "absent shard": ("qwen3_moe",
                     lambda d: os.remove(d / "model-00003-of-00003.safetensors"),
                     "shard model-00003-of-00003.safetensors"),
    "wrong shape": ("olmoe", lambda d: _edit_config(d, intermediate_size=10),
                    "but config.json gives [10, 16]"),
    "unimplemented field": ("mixtral", lambda d: _edit_config(d, sliding_window=16),
                            "config.json sliding_window: 16"),
    "unsupported family": ("mixtral", lambda d: _edit_config(d, architectures=["GPT2"]),
                           "config.json architectures: GPT2 is not supported"),
}


def _drop_tensor(directory, name):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = str(directory / "model.safetensors")
    with safe_open(path, "numpy") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != name}
    save_file(tensors, path)


def _edit_config(directory, **changes):
    data = json.loads((directory / "config.json").read_text())
    data.update(changes)
    (directory / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_on_every_rank(case, tmp_path):
    name, damage, message = BAD_CHECKPOINTS[case]
    directory = copy_checkpoint(tmp_path, name)
    damage(directory)
    out = tmp_path / "out.npz"
    result = spmd_moe("run", "--model", str(directory), "--output", str(out), ranks=2,
                      per_rank_status=True)
    check_refused(result, message, out)


@pytest.mark.parametrize("args,message", [
    (["--preset", "tiny"], "--preset: cannot be combined with --model"),
    (["--set", "n_layers=2"], "--set n_layers: fixed by"),
    (["--dtype", "float16"], "dtype: 'float16' is not one of"),
])
def test_model_options_that_conflict_are_refused(args, message, tmp_path):
    out = tmp_path / "out.npz"
    result = spmd_moe("run", "--model", os.path.join(HF, "mixtral"), *args, "--output",
                      str(out), ranks=2, per_rank_status=True)
    check_refused(result, message, out)


def test_info_says_what_runs_a_model_s_family():
    result = spmd_moe("info", "--backend", "numpy", "--model", os.path.join(HF, "qwen3_moe"))
    assert result.returncode == 0, result.stderr
    assert "--model:       qwen3_moe" in result.stdout and "generic array code" in result.stdout
