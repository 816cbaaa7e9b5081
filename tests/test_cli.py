"""The command line itself: the README's commands, the output file, and every bad input
giving one clear line on rank 0, a non-zero exit on every rank, no hang, no output file."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from spmd_moe.core.config import build_run_config
from spmd_moe.engine.testing import check_against_reference, reference_for
from spmd_moe.model.inputs import synthetic_input

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
TIMEOUT = 120


def spmd_moe(*args, ranks=1, env=None, per_rank_status=False, preexec_fn=None,
             timeout=TIMEOUT):
    """Run the CLI (under mpiexec when ranks > 1) in its own process group, killed whole
    (and the test failed) after ``timeout`` seconds; with ``per_rank_status`` every rank
    prints its own exit status as ``rank-exit N`` on stderr."""
    command = [sys.executable, "-m", "spmd_moe", *args]
    if per_rank_status:
        quoted = " ".join(f"'{a}'" for a in command)
        command = ["sh", "-c", f'{quoted}; s=$?; echo "rank-exit $s" >&2; exit $s']
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"still running after {timeout} s (killed):\n{stderr}")
    except BaseException:                 # the test's own time limit: leave no job behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


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
    memory = data["memory_per_rank"]
    assert len(memory["by_rank"]) == 4
    for row in memory["by_rank"]:
        assert 0 < row["rss_before_mb"] <= row["peak_rss_mb"]
        assert 0 < row["rss_end_mb"] <= row["peak_rss_mb"]
        assert row["growth_mb"] == pytest.approx(row["rss_end_mb"] - row["rss_first_mb"])
    assert data["watchdog"] == "stall timeout 600 s"
    assert all(slow["times_median"] > 3 for slow in data["slow_iterations"])
    assert "memory per rank" in result.stdout


def test_decode_from_an_input_file(tmp_path):
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.savez(tmp_path / "in.npz", ids=ids, mask=mask)
    out = tmp_path / "out.npz"
    result = spmd_moe("run", "--preset", "tiny", "--dtype", "float32", "--input",
                      str(tmp_path / "in.npz"), "--workload", "decode", "--new-tokens", "3",
                      "--output", str(out), ranks=2)
    assert result.returncode == 0, result.stderr
    from spmd_moe.model.reference import reference_forward, reference_generate

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
    # NumPy: two in flight pay only without a pipeline to fill (chunks.overlap_pays).
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
    assert "threads:     MPI_THREAD_" in result.stdout
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
    "memory limit nan": (["--memory-limit", "nan"], "--memory-limit: nan must be a finite"),
    "memory limit inf": (["--memory-limit", "inf"], "--memory-limit: inf must be a finite"),
    "huge n_layers": (["--set", "n_layers=99999999999999999999"],
                      "n_layers: 99999999999999999999 is too large"),
    "infinite norm_eps": (["--set", "norm_eps=Infinity"], "norm_eps: inf must be a finite"),
    "new tokens without decode": (["--new-tokens", "4"],
                                  "--new-tokens: generates tokens only with --workload decode"),
    "layout key repeated": (["--layout", "ep=2,ep=1"], "layout: 'ep=2,ep=1' gives ep twice"),
    "micro-batches beyond the batch": (["--micro-batches", "1000000000"],
                                       "--micro-batches: 1000000000 is more than batch_size=5"),
    "negative chunk": (["--chunk-tokens", "-3"], "--chunk-tokens: -3 must be an integer >= 0"),
    "huge chunk": (["--chunk-tokens", "99999999999"],
                   "--chunk-tokens: 99999999999 is too large (at most 2147483647)"),
    "chunks and whole micro-batches": (["--chunk-tokens", "4", "--micro-batches", "2"],
                                       "--chunk-tokens: 4 chunk tokens and micro_batches=2"),
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
                                   "in.npz: sequence 0's prompt length 60 + "
                                   "new_tokens 10 = 70 exceeds max_seq_len=64"),
}


def check_refused(result, message, out=None, ranks=2):
    """One error line on rank 0 holding ``message``, no traceback, every rank exits 2,
    no output file."""
    errors = [l for l in result.stderr.splitlines() if l.startswith("spmd-moe: error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    statuses = [l for l in result.stderr.splitlines() if l.startswith("rank-exit")]
    assert statuses == ["rank-exit 2"] * ranks, result.stderr
    assert result.returncode != 0
    assert out is None or not out.exists()


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


@pytest.mark.parametrize("name", ["text.npz", "empty.npz", "truncated.npz", "crc.npz",
                                  "objects.npz", "fifo.npz", "/dev/zero"])
def test_a_broken_input_file_is_one_line_on_every_rank(name, tmp_path):
    from spmd_moe.core.config import PRESETS
    from spmd_moe.engine.testing import broken_inputs

    path, reason = broken_inputs(tmp_path, PRESETS["tiny"].model.vocab_size)[name]
    out = tmp_path / "out.npz"
    # A FIFO or /dev/zero used to block or grow forever: bounded here.
    result = spmd_moe("run", "--preset", "tiny", "--input", str(path), "--output", str(out),
                      ranks=2, per_rank_status=True, timeout=60)
    check_refused(result, reason, out)


def peak_rss(*args, ranks):
    """Run the CLI under mpiexec in a wrapper process; returns (its result, the peak RSS in
    bytes of the largest process of the job, as the kernel accounts for reaped children)."""
    code = ("import json, resource, subprocess, sys; "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(json.dumps([r.returncode, r.stdout, r.stderr, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    quoted = " ".join(f"'{a}'" for a in (sys.executable, "-m", "spmd_moe", *args))
    job = [MPIEXEC, "-n", str(ranks), "sh", "-c",
           f'{quoted}; s=$?; echo "rank-exit $s" >&2; exit $s']
    wrapper = subprocess.Popen([sys.executable, "-c", code, *job], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        output, _ = wrapper.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(wrapper.pid, signal.SIGKILL)
        wrapper.communicate()
        pytest.fail(f"still running after {TIMEOUT} s (killed)")
    rc, stdout, stderr, kib = json.loads(output)
    return subprocess.CompletedProcess(job, rc, stdout, stderr), kib * 1024


def test_a_huge_synthetic_batch_is_refused_before_it_is_built():
    # 10M sequences of tiny: the batch alone would take ~1 GB per rank, and the run far more.
    result, peak = peak_rss("run", "--preset", "tiny", "--set", "batch_size=10000000",
                            ranks=2)
    check_refused(result, "layout: rank 0 needs")
    assert peak < 600 << 20, f"a process reached {peak / 2**20:.0f} MiB"


def test_an_input_that_inflates_is_refused_before_its_ids_are_read(tmp_path):
    # ~1 MiB on disk, 1 GiB of int64 ids: the headers give the size, the memory check
    # refuses the run (the KV cache of 2M sequences' decode; a prefill's activations are
    # bounded by its chunks); the ids are never read.
    import time
    import zipfile

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("ids.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {
                "descr": "<i8", "fortran_order": False, "shape": (2 ** 21, 64)})
            zeros = bytes(1 << 20)
            for _ in range(1024):
                member.write(zeros)
    assert path.stat().st_size < 4 << 20
    start = time.monotonic()
    result, peak = peak_rss("run", "--preset", "tiny", "--set", "max_seq_len=128", "--input",
                            str(path), "--workload", "decode", "--new-tokens", "8", ranks=2)
    check_refused(result, "layout: rank 0 needs")
    assert peak < 600 << 20, f"a process reached {peak / 2**20:.0f} MiB"
    assert time.monotonic() - start < 60


def test_a_config_file_that_is_not_a_file_is_refused():
    result = spmd_moe("run", "--config", "/dev/zero", ranks=2, per_rank_status=True,
                      timeout=60)
    check_refused(result, "--config: /dev/zero is a character device, not a regular file")


def test_a_config_with_a_model_section_and_an_input_runs_the_inputs_workload(tmp_path):
    # The file's base is the paper preset (batch 128 x 10000); the input replaces batch and
    # length, and only that workload is checked against the file's max_seq_len.
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"model": {
        "num_layers": 2, "experts_per_layer": 4, "token_dimension": 32, "mlp_hidden_size": 40,
        "attention_heads": 4, "precision": "fp32", "vocab_size": 101, "max_seq_len": 64}}))
    ids = np.array([[0, 7, 8, 9], [1, 2, 3, 4], [5, 6, 7, 8]])
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    np.savez(tmp_path / "in.npz", ids=ids, mask=mask)
    out = tmp_path / "out.npz"
    result = spmd_moe("run", "--config", str(config), "--input", str(tmp_path / "in.npz"),
                      "--output", str(out), ranks=2)
    assert result.returncode == 0, result.stderr
    from spmd_moe.model.reference import reference_forward

    model = build_run_config(config_file=str(config), batch_size=3, seq_len=4).model
    with np.load(out) as outputs:
        check_against_reference(dict(outputs), reference_forward(model, ids, mask), "float32")


def test_a_rank_failing_mid_run_brings_the_job_down(tmp_path):
    out = tmp_path / "out.npz"
    result = spmd_moe("run", "--preset", "tiny", "--output", str(out), ranks=3,
                      env={"SPMD_MOE_FAULT": "1:1"})
    assert result.returncode != 0
    assert "injected fault (SPMD_MOE_FAULT) on rank 1 at layer 1" in result.stderr
    assert not out.exists()


def test_usage_hint_names_the_command_once():
    top = spmd_moe("--frobnicate")
    assert top.returncode == 2 and "(see spmd-moe -h)" in top.stderr, top.stderr
    sub = spmd_moe("plan", "--frobnicate")
    assert sub.returncode == 2 and "(see spmd-moe plan -h)" in sub.stderr, sub.stderr


def test_the_layout_run_is_the_layout_asked(tmp_path):
    report = tmp_path / "report.json"
    result = spmd_moe("run", "--preset", "tiny", "--layout", "ep=2,tp=1", "--report",
                      str(report), ranks=4)
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["layout"] == "ep=2,pp=2"


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
# --- output paths ----------------------------------------------------------------------

def make_target(tmp_path, kind):
    """An output path of ``kind`` and a function that says it is untouched."""
    if kind == "symlink":
        (tmp_path / "precious").write_text("keep")
        (tmp_path / "out.npz").symlink_to(tmp_path / "precious")
        return tmp_path / "out.npz", lambda p: p.is_symlink() and \
            (tmp_path / "precious").read_text() == "keep"
    if kind == "fifo":
        os.mkfifo(tmp_path / "out.npz")
        return tmp_path / "out.npz", lambda p: stat.S_ISFIFO(p.lstat().st_mode)
    if kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(tmp_path / "out.npz", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # as /dev/null
        return tmp_path / "out.npz", lambda p: stat.S_ISCHR(p.lstat().st_mode)
    (tmp_path / "out.npz").mkdir()
    return tmp_path / "out.npz", lambda p: p.is_dir() and not any(p.iterdir())


@pytest.mark.parametrize("kind, message", [
    ("symlink", "is a symbolic link"), ("fifo", "is a FIFO"),
    ("device", "is a character device"), ("directory", "is a directory")])
@pytest.mark.parametrize("option", ["--output", "--report"])
def test_an_output_path_that_is_not_a_file_is_refused_before_any_work(tmp_path, kind,
                                                                       message, option):
    path, untouched = make_target(tmp_path, kind)
    result = spmd_moe("run", "--preset", "tiny", option, str(path), ranks=2,
                      per_rank_status=True)
    check_refused(result, f"{option}: {path} {message}")
    assert untouched(path)
    assert "tokens/s" not in result.stdout                   # nothing ran


def test_output_and_report_on_the_same_file_are_refused(tmp_path):
    (tmp_path / "alias").symlink_to(tmp_path)
    for report in (tmp_path / "x", tmp_path / "alias" / "x"):
        result = spmd_moe("run", "--preset", "tiny", "--output", str(tmp_path / "x"),
                          "--report", str(report), ranks=2, per_rank_status=True)
        check_refused(result, "is the same file as --output", tmp_path / "x")


def test_outputs_honour_the_umask(tmp_path):
    out, report = tmp_path / "out.npz", tmp_path / "report.json"
    result = spmd_moe("run", "--preset", "tiny", "--output", str(out), "--report", str(report),
                      ranks=2, preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(report.stat().st_mode) == 0o640


@pytest.fixture
def small_disk(tmp_path):
    """An 8 KiB tmpfs (root only: skipped elsewhere; data.write_files' own test injects
    ENOSPC without one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_leaves_no_file_and_every_rank_exits_2(small_disk):
    # tiny's .npz (hidden 5x11x32 float32 and more, ~10 KiB) does not fit; its report
    # (~4 KiB) would: nothing may be left, not even a complete report.
    out, report = small_disk / "out.npz", small_disk / "report.json"
    result = spmd_moe("run", "--preset", "tiny", "--report", str(report), "--output",
                      str(out), ranks=2, per_rank_status=True)
    check_refused(result, f"--output: cannot write {out}: No space left on device", out)
    assert list(small_disk.iterdir()) == []


def test_bench_and_compare_check_their_output_paths(tmp_path):
    (tmp_path / "dir").mkdir()
    bench = spmd_moe("bench", "--json", str(tmp_path / "dir"), per_rank_status=True, ranks=1)
    check_refused(bench, f"--json: {tmp_path / 'dir'} is a directory", ranks=1)
    os.mkfifo(tmp_path / "fifo")
    compare = spmd_moe("compare", "--preset", "tiny", "--report", str(tmp_path / "fifo"),
                       ranks=2, per_rank_status=True)
    check_refused(compare, f"--report: {tmp_path / 'fifo'} is a FIFO")


# --- hostile files, limits and rates (issue #22) -------------------------------------------

def test_no_command_writes_over_its_input(tmp_path):
    np.savez(tmp_path / "in.npz", ids=np.array([[1, 2, 3]]))
    before = (tmp_path / "in.npz").read_bytes()
    result = spmd_moe("run", "--preset", "tiny", "--input", str(tmp_path / "in.npz"),
                      "--output", str(tmp_path / "in.npz"), ranks=2, per_rank_status=True)
    check_refused(result, f"--output: {tmp_path / 'in.npz'} is the input --input")
    model = copy_checkpoint(tmp_path, "olmoe")
    for option in ("--report", "--trace"):
        result = spmd_moe("run", "--model", str(model), option, str(model / "config.json"),
                          per_rank_status=True, ranks=1)
        check_refused(result, f"{option}: {model / 'config.json'} is the input --model",
                      ranks=1)
    assert (tmp_path / "in.npz").read_bytes() == before
    assert json.loads((model / "config.json").read_text())["model_type"] == "olmoe"


def test_a_newline_in_a_config_string_cannot_forge_a_second_error_line(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"preset": "tiny", "dtype": "x\nspmd-moe: error: forged"}))
    result = spmd_moe("run", "--config", str(config), per_rank_status=True, ranks=1)
    check_refused(result, "dtype: 'x\\nspmd-moe: error: forged' is not one of", ranks=1)


@pytest.mark.parametrize("args, message", [
    (["--hbm-gbps", "0"], "--hbm-gbps: 0.0 must be a finite number of GB/s > 0"),
    (["--hbm-gbps", "nan"], "--hbm-gbps: nan must be a finite number of GB/s > 0"),
    (["--hbm-gbps", "-5"], "--hbm-gbps: -5.0 must be a finite number of GB/s > 0"),
    (["--device-memory", "nan"], "--device-memory: nan must be a finite number of GiB > 0"),
    (["--device-memory", "inf"], "--device-memory: inf must be a finite number of GiB > 0"),
])
def test_plan_limits_and_rates_are_finite_and_positive(args, message, capsys):
    from spmd_moe.commands import cli

    assert cli.main(["plan", "--preset", "tiny", "--world-size", "1", "--workload", "decode",
                     "--new-tokens", "2", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"spmd-moe: error: {message}\n" and "fits" not in captured.out


@pytest.mark.parametrize("args, env, message", [
    (["run", "--preset", "tiny", "--workload", "decode", "--new-tokens", "1000000000"], {},
     "--new-tokens: prompt length 11 + new_tokens 1000000000"),
    (["run", "--preset", "tiny"], {"SPMD_MOE_FAULT": "0:0:sleep:1e300"},
     "SPMD_MOE_FAULT: '0:0:sleep:1e300': SECONDS must be a number in [0, 86400]"),
    (["run", "--preset", "tiny"], {"SPMD_MOE_FAULT": "0:0:sleep:nan"},
     "SPMD_MOE_FAULT: '0:0:sleep:nan': SECONDS must be"),
    (["export", "--preset", "tiny", "--max-shard-size", "inf", "{t}/m"], {},
     "--max-shard-size: inf must be a finite number of MB > 0"),
    (["export", "--preset", "tiny", "--max-shard-size", "1e-9", "{t}/m"], {},
     "--max-shard-size: 1e-09 MB is less than a byte"),
    (["export", "--preset", "tiny", ""], {}, "export: the path is empty"),
    (["export", "--preset", "tiny", "{t}/dangling"], {},
     "export: {t}/dangling is a symbolic link"),
])
def test_limits_and_export_paths_are_one_line(tmp_path, args, env, message):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    args = [a.format(t=tmp_path) for a in args]
    result = spmd_moe(*args, env=env, per_rank_status=True, ranks=1, timeout=60)
    check_refused(result, message.format(t=tmp_path), ranks=1)
    assert sorted(os.listdir(tmp_path)) == ["dangling"]


@pytest.mark.slow
def test_an_export_ended_by_a_signal_leaves_nothing_and_can_be_rerun(tmp_path):
    """SIGTERM while the shards are written: no directory (before, 6 of 11 shards and no
    config.json, and a rerun was refused), no temporary left; the rerun writes it whole."""
    import time

    target = tmp_path / "m"
    command = [sys.executable, "-m", "spmd_moe", "export", "--preset", "small", "--set",
               "n_layers=48", "--max-shard-size", "4", str(target)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            staged = [p for p in tmp_path.iterdir() if p.name.startswith(".spmd_moe-")]
            if staged and len(list(staged[0].iterdir())) >= 2:     # a shard written
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "got SIGTERM" in stderr and list(tmp_path.iterdir()) == []
    again = spmd_moe("export", "--preset", "tiny", "--max-shard-size", "0.02", str(target))
    assert again.returncode == 0, again.stderr
    assert "config.json" in os.listdir(target) and len(os.listdir(target)) > 3
def test_non_finite_router_logits_end_the_job_with_one_line(tmp_path):
    out = tmp_path / "out.npz"
    result = spmd_moe("run", "--preset", "tiny", "--output", str(out), ranks=2,
                      env={"SPMD_MOE_FAULT": "1:2:nan"})
    assert result.returncode == 1
    assert ("spmd-moe: error: rank 1: layer 2: non-finite router logits (NaN, inf or no "
            "finite value) for 1 token(s) of rank 1") in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
