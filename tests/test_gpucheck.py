"""bin/gpu-check and its Python steps (spmd_moe/tools/gpucheck/), without a GPU.

- The whole check in ``--cpu`` mode (its stages on NumPy at tiny sizes): every stage passes,
  the seven files are there, summary.md has every section, and no traceback anywhere.
- The preflight: a libmpi that cannot load, no launcher on PATH, a launcher that is not
  the MPI library's. Each: one line naming what is missing, exit 3, no later stage, no
  traceback in the output or the files.
- Usage errors, and a rerun of some stages (``GPU_CHECK_ONLY``).
- The steps' pieces: a run that cannot start and a missing launcher are results, not
  crashes; pytest's counts; the decode floor is the one ``spmd-moe plan`` prints; the
  summary of GPU-shaped results.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from spmd_moe.tools.gpucheck import common, decode, runs, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bin", "gpu-check")
FILES = {"gpu-check.log", "pytest-gpu.log", "compare.json", "bench.json", "transport.json",
         "decode.json", "summary.md"}
STAGE_TITLES = ("compile kernels", "facts", "gpu tests", "cupy vs numpy", "bench (paper shapes)",
                "transport 2 and 4 ranks", "decode vs floor")


def gpu_check(tmp_path, *args, env=None, timeout=1500):
    """Run bin/gpu-check with OUT under tmp_path; (exit status, stdout+stderr, OUT)."""
    out = tmp_path / "out"
    full_env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **(env or {})}
    proc = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=tmp_path)
    return proc.returncode, proc.stdout + proc.stderr, out


def assert_no_traceback(output, out):
    assert "Traceback" not in output
    for path in out.iterdir():
        assert "Traceback" not in path.read_text(errors="replace"), path.name


# --- the whole check, --cpu ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    return gpu_check(tmp_path_factory.mktemp("gpu-check"), "--cpu")


@pytest.mark.slow
def test_cpu_check_passes_every_stage(cpu_check):
    status, output, out = cpu_check
    assert status == 0, output[-6000:]
    assert {p.name for p in out.iterdir()} == FILES
    for title in STAGE_TITLES:
        assert re.search(rf"^== {re.escape(title)}: ok in \d+s$", output, re.MULTILINE), title
    assert "preflight: passed" in output
    assert_no_traceback(output, out)


@pytest.mark.slow
def test_cpu_check_files_hold_the_numbers(cpu_check):
    status, output, out = cpu_check
    compare = json.loads((out / "compare.json").read_text())
    assert compare["ok"] and [c["ranks"] for c in compare["cases"]] == [1, 1, 1, 2, 2, 2]
    transport = json.loads((out / "transport.json").read_text())
    assert set(transport) == {"2", "4"}
    assert all(t["ok"] and t["roundtrip_ok"] and t["world_size"] == int(n)
               for n, t in transport.items())
    decode = json.loads((out / "decode.json").read_text())
    assert decode["ok"] and decode["floor"]["floor_ms"] > 0 and decode["ratio_to_floor"] > 0
    bench = json.loads((out / "bench.json").read_text())
    assert bench["attention_tiles"]["available"] is False        # NumPy: no fused kernels
    summary = (out / "summary.md").read_text()
    assert summary.startswith("## bin/gpu-check --cpu rehearsal")
    for heading in ("### GPU tests", "### CuPy against NumPy", "### Layer step",
                    "### Dispatch + combine", "### Decode step"):
        assert heading in summary, heading
    assert "\nnot run\n" not in summary          # every section has its numbers
    assert summary in output                       # printed last, for the caller's tail


# --- the preflight ----------------------------------------------------------------------------

def assert_stopped_at_preflight(status, output, out, about):
    assert status == 3, output
    failures = [line for line in output.splitlines() if line.startswith("gpu-check: preflight")]
    assert len(failures) == 1 and failures[0].startswith(
        f"gpu-check: preflight failed: {about}"), output
    assert not re.search(r"^== (?!preflight)", output, re.MULTILINE), output   # no later stage
    assert {p.name for p in out.iterdir()} == {"gpu-check.log", "summary.md"}
    assert failures[0] in (out / "summary.md").read_text()
    assert_no_traceback(output, out)
    return failures[0]


def test_preflight_stops_when_libmpi_cannot_load(tmp_path):
    status, output, out = gpu_check(tmp_path, "--cpu",
                                    env={"MPI4PY_LIBMPI": "/nonexistent/libmpi.so"})
    line = assert_stopped_at_preflight(status, output, out, "MPI library:")
    assert "/nonexistent/libmpi.so" in line
    # One line about MPI, and it is that one.
    assert [l for l in output.splitlines() if re.search(r"\bMPI\b", l)] == [line]


def bin_dir_with(tmp_path, programs: dict[str, str]):
    """A PATH folder with the given scripts and python3 (this interpreter), ahead of the
    system folders only: no venv bin on it."""
    folder = tmp_path / "bin"
    folder.mkdir()
    os.symlink(sys.executable, folder / "python3")
    for name, text in programs.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    path = f"{folder}:/usr/bin:/bin"
    return path


def test_preflight_stops_without_a_launcher(tmp_path):
    """An empty launcher prefix is reported as such (it once became the string "''", which
    hid the missing launcher until subprocess.run(['', ...]) raised later on)."""
    path = bin_dir_with(tmp_path, {})
    if shutil.which("mpiexec", path=path) or shutil.which("mpirun", path=path):
        pytest.skip("this machine has an MPI launcher in /usr/bin")
    status, output, out = gpu_check(tmp_path, "--cpu", env={"PATH": path})
    line = assert_stopped_at_preflight(status, output, out, "launcher:")
    assert line.endswith("no mpiexec or mpirun on PATH")


FAKE_LAUNCHER = f"""#!{sys.executable}
# Starts N copies of a command, as a launcher of another MPI would: each is a singleton.
import subprocess, sys
if sys.argv[1:] == ["--version"]:
    print("a launcher of some other MPI")
    sys.exit(0)
n, command = int(sys.argv[2]), sys.argv[3:]
sys.exit(max(p.wait() for p in [subprocess.Popen(command) for _ in range(n)]))
"""


def test_preflight_stops_when_the_launcher_is_not_the_libraries(tmp_path):
    path = bin_dir_with(tmp_path, {"mpiexec": FAKE_LAUNCHER})
    status, output, out = gpu_check(tmp_path, "--cpu", env={"PATH": path})
    line = assert_stopped_at_preflight(status, output, out, "launcher:")
    assert "each saw a world of 1" in line


# --- usage and reruns -------------------------------------------------------------------------

@pytest.mark.parametrize("args,env,message", [
    (["--gpu"], {}, "unknown argument '--gpu'"),
    (["--cpu", "--wheels"], {}, "--wheels needs a folder"),
    (["--cpu"], {"GPU_CHECK_ONLY": "bench,nothing"}, "GPU_CHECK_ONLY: 'nothing' is not one of"),
    (["--cpu"], {"GPU_CHECK_BUDGET": "5m"}, "GPU_CHECK_BUDGET='5m' is not a whole number"),
])
def test_usage_errors_are_one_line(tmp_path, args, env, message):
    status, output, _ = gpu_check(tmp_path, *args, env=env, timeout=60)
    assert status == 2 and output.strip().count("\n") == 0 and message in output, output


def test_wheels_folder_without_mpich_stops_the_check(tmp_path):
    (tmp_path / "wheels").mkdir()
    status, output, out = gpu_check(tmp_path, "--cpu", "--wheels", "wheels", timeout=60)
    assert status == 3 and "gpu-check: wheels failed: wheels holds 0 mpich wheels" in output
    assert "== preflight" not in output
    assert_no_traceback(output, out)


def test_mpich_installed_under_a_distribution_python_s_scheme_is_found(tmp_path):
    """A distribution's python3 (Debian's, pip 23) installs ``--prefix DIR`` under
    DIR/local/{lib,bin} (its posix_local scheme): the check finds libmpi and the launcher
    wherever the scheme put them. A stand-in pip lays the wheel out that way (this venv's
    own libmpi, its libraries and Hydra, linked)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "mpich-5.0.2-py3-none-manylinux_2_28_x86_64.whl").write_bytes(b"")
    launcher = shutil.which("mpiexec")
    libmpi = os.path.join(sys.prefix, "lib", "libmpi.so.12")
    if launcher is None or not os.path.exists(libmpi):
        pytest.skip("no venv-installed MPICH to lay out")
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
if [ "$1 $2 $3" = "-m pip install" ]; then
    while [ $# -gt 0 ]; do [ "$1" = --prefix ] && prefix=$2; shift; done
    mkdir -p "$prefix/local/lib" "$prefix/local/bin"
    for lib in {os.path.dirname(libmpi)}/lib*.so* {os.path.dirname(libmpi)}/mpich; do
        ln -s "$lib" "$prefix/local/lib/"
    done
    for tool in mpiexec hydra_pmi_proxy; do
        ln -s "$(dirname {launcher})/$tool" "$prefix/local/bin/$tool"
    done
    exit 0
fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    status, output, out = gpu_check(tmp_path, "--cpu", "--wheels", str(wheels),
                                    env={"PYTHON": str(python), "GPU_CHECK_ONLY": "compile"},
                                    timeout=300)
    assert status == 0, output[-3000:]
    assert re.search(r"MPI4PY_LIBMPI=\S*/\.gpu-check\.\w+/mpi/local/lib/libmpi\.so\.12", output)
    assert re.search(r"PATH starts \S*/mpi/local/bin", output)
    assert "preflight: launcher ok" in output and "preflight: passed" in output


def test_preflight_names_every_missing_package():
    from spmd_moe.tools.gpucheck.preflight import check_python_packages

    found = check_python_packages(lambda name: None if name in ("ml_dtypes", "safetensors")
                                  else object())
    assert not found.ok and found.detail.startswith(
        "missing ml_dtypes (the backend's bfloat16), safetensors (the checkpoint tests)")
    assert check_python_packages().ok


def test_the_compile_stage_warms_cupy_s_own_kernels(monkeypatch, fake_gpu):
    """What the later stages run, at tiny sizes, on the CuPy backend (here the fake
    device's): CuPy compiles its elementwise and reduction kernels once, in this stage."""
    from fakes.engine import fake_gpu_sessions

    from spmd_moe.backend import array
    from spmd_moe.backend.host import host_memory
    from spmd_moe.tools.gpucheck.facts import warm_cupy_kernels

    monkeypatch.setattr(array, "available_memory", lambda choice, ranks: host_memory(ranks))
    with fake_gpu_sessions(monkeypatch, "mpi-host"):
        ran = warm_cupy_kernels("cupy")
    assert ran == ["bfloat16 prefill, decode and layer step",
                   "float32 prefill, decode and layer step"]
    assert fake_gpu.executed > 0 and len(fake_gpu.backends) == 2


def test_a_rerun_of_some_stages(tmp_path):
    status, output, out = gpu_check(tmp_path, "--cpu", env={"GPU_CHECK_ONLY": "bench"})
    assert status == 0, output[-4000:]
    assert "== bench (paper shapes): ok" in output and "== facts" not in output
    summary = (out / "summary.md").read_text()
    assert "| facts | not selected (GPU_CHECK_ONLY) | 0 |" in summary
    assert "Command: `GPU_CHECK_ONLY=bench bin/gpu-check --cpu`" in summary
    assert {p.name for p in out.iterdir()} == {"gpu-check.log", "bench.json", "summary.md"}


# --- the steps' pieces -------------------------------------------------------------------------

def test_a_command_that_cannot_start_is_a_result():
    status, why, _ = common.run_command(["/nonexistent/launcher", "2", "python"])
    assert status is None and why.startswith("cannot start /nonexistent/launcher")


def test_a_command_that_hangs_is_killed_with_its_children():
    began = time.monotonic()
    status, why, _ = common.run_command(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               "'import time; time.sleep(60)'])"], timeout=1.0)
    assert status is None and why == "timed out after 1 s"
    assert time.monotonic() - began < 30      # not the child's 60 s: the group was killed


def test_a_stage_timeout_ends_the_commands_a_step_started(tmp_path):
    """The stage's `timeout` signals its own process group; the runs a step started live in
    groups of their own (so that mpiexec and its ranks can be killed together), so the step
    ends them itself on SIGTERM instead of leaving them running into the next stage."""
    pid_file = tmp_path / "child.pid"
    sleeper = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
               "time.sleep(120)")
    step = ("import sys; from spmd_moe.tools.gpucheck import __main__ as gpucheck_main, common; "
            "gpucheck_main.STEPS['sleep'] = (lambda: common.run_command([sys.executable, '-c', "
            f"{sleeper!r}], timeout=120)[0] or 0, 0); sys.exit(gpucheck_main.main(['sleep']))")
    proc = subprocess.run(["timeout", "30", sys.executable, "-c", step], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 124, proc.stdout + proc.stderr
    child = int(pid_file.read_text())
    for _ in range(50):                      # the kill is immediate; reaping may lag a little
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the command the step started outlived the stage's timeout")


def test_no_launcher_means_no_multi_rank_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("GPU_CHECK_LAUNCH", "")
    assert common.ranks_command(2, ["python"]) == "no MPI launcher (mpiexec or mpirun) on PATH"
    assert common.ranks_command(1, ["python"]) == ["python"]
    monkeypatch.setenv("GPU_CHECK_LAUNCH", "'/opt/my mpi/mpiexec' -n ")
    assert common.ranks_command(4, ["python"]) == ["/opt/my mpi/mpiexec", "-n", "4", "python"]
    # compare records each case's failure and goes on; no 2-rank run is attempted.
    monkeypatch.setenv("GPU_CHECK_LAUNCH", "")
    started = []
    monkeypatch.setattr(runs, "run_command",
                        lambda cmd, timeout=0: (started.append(cmd), (1, "boom\n", 0.1))[1])
    status = runs.compare(str(tmp_path), str(tmp_path / "compare.json"), "numpy")
    result = json.loads((tmp_path / "compare.json").read_text())
    assert status == 1 and not result["ok"] and len(result["cases"]) == 6
    assert all("mpiexec" not in " ".join(cmd) for cmd in started) and len(started) == 6
    assert all(c["error"].endswith("no MPI launcher (mpiexec or mpirun) on PATH")
               for c in result["cases"] if c["ranks"] == 2)
    assert all(c["error"] == "numpy run: exit 1: boom; exit 1: boom"
               for c in result["cases"] if c["ranks"] == 1)


def test_pytest_outcome(tmp_path):
    log = tmp_path / "pytest-gpu.log"
    log.write_text("....F.s\nFAILED tests/test_gpu.py::test_x - AssertionError\n"
                   "ERROR tests/test_kernels.py::test_y\n"
                   "== 1 failed, 40 passed, 3 skipped, 441 deselected, 1 error in 12.3s ==\n")
    outcome = summary.pytest_outcome(str(log))
    assert outcome["counts"] == {"failed": 1, "passed": 40, "skipped": 3, "deselected": 441,
                                 "error": 1}
    assert outcome["failures"] == ["FAILED tests/test_gpu.py::test_x - AssertionError",
                                   "ERROR tests/test_kernels.py::test_y"]
    assert summary.pytest_outcome(str(tmp_path / "missing.log")) == {"ran": False}


def test_decode_floor_is_the_one_plan_prints(capsys):
    from spmd_moe.commands.cli import main

    args = decode.DECODE_CONFIG["gpu"]
    floor = decode.decode_floor(args, 8, 4321.0)
    main(["plan", *args, "--workload", "decode", "--new-tokens", "8", "--world-size", "1",
          "--hbm-gbps", "4321", "--device-memory", "141"])
    printed = re.search(r"reads ([\d.]+) GB .*bandwidth floor ([\d.]+) ms at 4321 GB/s",
                        capsys.readouterr().out)
    assert printed is not None
    assert float(printed.group(1)) == pytest.approx(floor["total_gb"], abs=0.005)
    assert float(printed.group(2)) == pytest.approx(floor["floor_ms"], abs=0.005)
    # Paper model, 2 layers, 8 x 10,000 tokens on one rank: KV cache and all 16 experts.
    assert floor["bytes"]["expert_weights"] == 2 * 16 * 2 * 4096 * 16384 * 2
    assert floor["context"] == 10008


def test_summary_of_gpu_results(tmp_path):
    """The section a GPU run leaves, from GPU-shaped files: the title names the device,
    the ratios against PyTorch and the floor are there."""
    out = tmp_path
    (out / "pytest-gpu.log").write_text("== 80 passed, 453 deselected in 40.0s ==\n")
    stat = lambda ms: {"mean": ms, "min": ms, "max": ms, "all": [ms]}  # noqa: E731
    phases = {p: stat(1.0) for p in ("attention", "router", "experts")}
    bench = {"shape": {"seqs": 8, "seq_len": 10000, "d_model": 4096, "heads": 32,
                       "d_ff": 16384, "expert_rows": 160000, "dtype": "bfloat16"},
             "iterations": 3, "warmup": 1, "peak": {"tflops": 780.0, "source": "measured"},
             "phases_ms": phases, "attention_core_ms": stat(3.0), "step_ms": stat(90.0),
             "tflops": {"step": 669.0, "attention_core": 500.0},
             "mfu": {"step": 0.86, "attention_core": 0.64},
             "attention_tiles": {"available": True, "chosen": 128, "outputs_identical": True,
                                 "ms": {"64": stat(11.0), "128": stat(9.0)},
                                 "tflops": {"64": 595.0, "128": 728.0}},
             "peer": {"available": True, "torch": "2.11.0", "phases_ms": {"sdpa": stat(8.0)},
                      "errors": {}},
             "targets": [{"name": "attention, 128-query tiles vs SDPA", "ours_ms": 9.0,
                          "reference": "SDPA", "reference_ms": 8.0, "ratio": 1.125,
                          "required": 1.4, "aim": 1.1, "status": "required met, aim not"}]}
    (out / "bench.json").write_text(json.dumps(bench))
    decode = {"ok": True, "config": ["--preset", "paper"], "copy_how": "copy",
              "per_token_ms": {"mean": 4.0, "p50": 3.9, "p99": 4.5}, "decode": {"ttft_ms": 900.0},
              "floor": {"total_gb": 12.0, "bytes": {"kv_cache": 2.6e9}, "gbps": 4300.0,
                        "floor_ms": 2.79, "floor_ms_at_h200_datasheet": 2.5},
              "ratio_to_floor": 1.43}
    (out / "decode.json").write_text(json.dumps(decode))
    text = summary.summary_markdown(str(out), [("gpu tests", "ok", "40")],
                                     {"device_name": "NVIDIA H200", "python": "3.12.3"}, "380",
                                     "gpu", "bin/gpu-check --wheels .whl", "2026-12-01")
    assert text.startswith("## Measured on the H200 (2026-12-01)\n")
    assert "80 passed, 453 deselected" in text
    assert "64 queries 11.000 ms (595 TFLOP/s), 128 queries 9.000 ms (728 TFLOP/s)" in text
    assert "| attention, 128-query tiles vs SDPA | 9.000 | SDPA | 8.000 | 1.12x |" in text
    assert "| attention core (alone) | 3.000 | 500 | 64.0% |" in text
    assert "measured / floor = **1.43x**" in text
    assert "CuPy against NumPy" in text and "not run" in text   # no compare.json given
