"""The steps of ``bin/gpu-check`` in Python: ``python -m spmd_moe.tools.gpucheck STEP [args]``.

bin/gpu-check is the one command a session lent a GPU machine runs (docs/GPU.md). It
installs the carried wheels, runs these steps (and pytest and ``spmd-moe bench``) as
time-boxed stages, and leaves its files in ``$OUT``. Every step reports what it found and
ends with an exit status; none lets an exception through (a failure is one line), so no
traceback reaches the check's output or files.

- ``preflight MODE``: within seconds, before anything costly: the MPI library loads, a
  launcher starts 2 ranks that see each other, CuPy sees the GPU, NVRTC compiles one
  kernel. Any failure: one line naming what is missing, exit 3.
- ``compile MODE``: every kernel source into the on-disk cache (and, on the GPU, loaded),
  so that the later stages and their ranks load cubins instead of each paying NVRTC.
- ``facts BACKEND FACTS_JSON``: versions, the device, the bf16 census, the MPI library.
- ``compare WORK OUT_JSON BACKEND``: ``spmd-moe run`` on the backend under test at 1 and 2
  ranks against a NumPy run, by relative error.
- ``transport OUT_JSON BACKEND MODE``: ``spmd-moe bench --transport-only`` at 2 and 4 ranks
  (dispatch + combine against a raw Alltoallv of the same bytes).
- ``decode WORK OUT_JSON BACKEND MODE``: a decode step beside the memory-bandwidth floor
  ``spmd-moe plan`` prints for the same config, at a copy bandwidth measured in the step.
- ``summary OUT STAGES FACTS_JSON SECONDS MODE``: the stage table and the numbers, as the
  section to paste into docs/PERFORMANCE.md (``summary.md``).

The launch prefix (``mpiexec -n``, with Open MPI's flags where needed) comes from bin/gpu-check
in ``$GPU_CHECK_LAUNCH``, shell-quoted, the rank count to be appended.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

LAUNCH_ENV = "GPU_CHECK_LAUNCH"
# Seconds for `mpiexec -n 2 python -c ...` in the preflight (three times that with --cpu,
# which runs on busy 2-core machines: the preflight's own limit is 15 s, or 45 s there).
LAUNCH_TIMEOUT = 10.0
# Seconds for one `spmd-moe run` or `bench --transport-only` process (the decode run gets
# 2.5 times that): $GPU_CHECK_RUN_TIMEOUT, which bin/gpu-check sets higher for --cpu (a
# NumPy `small` run took over 60 s on the 2-core container at load 17).
RUN_TIMEOUT_ENV = "GPU_CHECK_RUN_TIMEOUT"
RUN_TIMEOUT = 60.0
PROBE_KERNEL = "expert_ffn.cu"
RANKS_PROBE = ("from mpi4py import MPI; w = MPI.COMM_WORLD; "
               "print(f'rank {w.Get_rank()} of {w.Get_size()}: sum {w.allreduce(1)}', "
               "flush=True)")
# The decode step measured on the GPU: the paper's model and one rank's 8 sequences of
# 10,000 tokens, cut to 2 layers (every expert on the one rank), device-drawn weights.
DECODE_CONFIG = {
    "gpu": ["--preset", "paper", "--set", "n_layers=2", "--set", "batch_size=8",
            "--set", "seq_len=10000", "--init", "device"],
    "cpu": ["--preset", "tiny"],
}
DECODE_NEW_TOKENS = {"gpu": 8, "cpu": 4}
H200_DATASHEET_GBPS = 4800.0


# Commands a step started, each in a process group of its own (so that a timeout can end
# mpiexec with its ranks): keyed by pid, which is also the group id.
_running: dict[int, subprocess.Popen] = {}


def _stop_children(signum, frame) -> None:
    """SIGTERM, from the stage's timeout: it signals the stage's process group, which the
    commands started here left. End them, then this step."""
    for pid in list(_running):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_timeout() -> float:
    return float(os.environ.get(RUN_TIMEOUT_ENV) or RUN_TIMEOUT)


def launch_prefix() -> list[str]:
    """The launcher prefix bin/gpu-check found (empty when there is none)."""
    return shlex.split(os.environ.get(LAUNCH_ENV, ""))


def _lines(exc: BaseException, count: int = 2) -> str:
    text = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(text[:count]) or type(exc).__name__


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- preflight -----------------------------------------------------------------------------

@dataclass
class Check:
    """One preflight check: ``detail`` holds the facts when it passed, what is missing when
    it did not."""

    name: str
    ok: bool
    detail: str


def python_line() -> str:
    """The interpreter and the versions of what the check imports (none is imported)."""
    found = [f"python {platform.python_version()} ({sys.executable})"]
    for name in ("mpi4py", "numpy", "ml_dtypes", "cupy-cuda13x", "cupy-cuda12x", "pytest",
                 "pytest-mpi", "torch"):
        version = _version(name)
        if version is not None:
            found.append(f"{name} {version}")
        elif name in ("mpi4py", "pytest", "pytest-mpi", "torch"):
            found.append(f"{name} not installed")
    return "; ".join(found)


def check_mpi_library() -> Check:
    """mpi4py loads a libmpi (without initialising MPI in this process)."""
    try:
        import mpi4py
    except Exception as exc:
        return Check("MPI library", False, f"mpi4py is not importable ({_lines(exc)})")
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    try:
        from mpi4py import MPI

        version = MPI.Get_library_version().strip().splitlines()[0].strip()
    except Exception as exc:
        where = os.environ.get("MPI4PY_LIBMPI")
        searched = (f"MPI4PY_LIBMPI={where}" if where else
                    "searched LD_LIBRARY_PATH and the Python prefix; MPI4PY_LIBMPI unset")
        return Check("MPI library", False,
                     f"mpi4py {mpi4py.__version__} cannot load libmpi ({_lines(exc, 3)}; "
                     f"{searched}); carry the mpich wheel: bin/gpu-check --wheels .whl "
                     "(docs/GPU.md)")
    from ..parallel.transport import loaded_libmpi_path

    return Check("MPI library", True, f"{version} ({loaded_libmpi_path() or 'path unknown'}, "
                                      f"mpi4py {mpi4py.__version__})")


def start_launcher_probe(launch: list[str]):
    """Start ``launch 2 python -c RANKS_PROBE`` in its own process group; a Check if it
    cannot start."""
    if not launch:
        return Check("launcher", False, "no mpiexec or mpirun on PATH")
    try:
        proc = subprocess.Popen([*launch, "2", sys.executable, "-c", RANKS_PROBE],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        _running[proc.pid] = proc
        return proc
    except OSError as exc:
        return Check("launcher", False, f"{launch[0]} cannot be started ({exc.strerror})")


def finish_launcher_probe(proc, launch: list[str], began: float,
                          limit: float = LAUNCH_TIMEOUT) -> Check:
    """Wait (up to ``limit`` seconds from ``began``) for the 2-rank probe and judge it."""
    command = f"{shlex.join(launch)} 2 python"
    try:
        out, err = proc.communicate(timeout=max(0.1, began + limit - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Check("launcher", False, f"`{command}` did not finish in {limit:.0f} s")
    finally:
        _running.pop(proc.pid, None)
    ranks = sorted(re.findall(r"rank (\d+) of (\d+): sum (\d+)", out))
    if proc.returncode == 0 and ranks == [("0", "2", "2"), ("1", "2", "2")]:
        return Check("launcher", True, f"`{command}` started 2 ranks that see each other "
                                       f"({time.monotonic() - began:.1f} s)")
    if ranks and all(size == "1" for _, size, _ in ranks):
        return Check("launcher", False,
                     f"`{command}` started {len(ranks)} processes that each saw a world of "
                     "1: the launcher is not the one of the MPI library mpi4py loads")
    last = (err.strip().splitlines() or out.strip().splitlines() or ["no output"])[-1]
    return Check("launcher", False, f"`{command}` failed (exit {proc.returncode}): "
                                    f"{last.strip()[:200]}")


def check_gpu(mode: str) -> tuple[Check, str | None]:
    """CuPy sees device 0 and can make a context on it: ``(Check, compute capability)``."""
    if mode == "cpu":
        return Check("GPU", True, "not needed (--cpu)"), None
    from ..backend.array import probe_cupy

    cupy, why_not = probe_cupy()
    if cupy is None:
        return Check("GPU", False, f"CuPy sees no GPU: {why_not}"), None
    try:
        runtime = cupy.cuda.runtime
        cupy.cuda.Device(0).use()
        free, total = runtime.memGetInfo()
        props = runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        cc = f"{props['major']}{props['minor']}"
        detail = (f"{name}, sm_{cc}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free), "
                  f"{runtime.getDeviceCount()} device(s); CuPy {cupy.__version__}, CUDA "
                  f"runtime {runtime.runtimeGetVersion()}, driver {runtime.driverGetVersion()}")
    except Exception as exc:
        return Check("GPU", False, f"CuPy cannot use device 0 ({_lines(exc)})"), None
    if int(cc) < 80:
        detail += "; the fused kernels need sm_80 (the generic CuPy code will run)"
    return Check("GPU", True, detail), cc


def check_nvrtc(mode: str, compute_capability: str | None) -> Check:
    """NVRTC compiles the smallest kernel source for the device (sm_90a in --cpu mode)."""
    from ..backend.kernels.compile import compile_source, device_arch

    arch = device_arch(compute_capability) if compute_capability else "sm_90a"
    try:
        from cupy.cuda import nvrtc
    except Exception as exc:
        if mode == "cpu":
            return Check("NVRTC", True, f"skipped: CuPy is not importable ({_lines(exc, 1)}; "
                                        "--cpu)")
        return Check("NVRTC", False, f"cupy.cuda.nvrtc is not importable ({_lines(exc)})")
    began = time.monotonic()
    try:
        compile_source(PROBE_KERNEL, arch)
        version = ".".join(map(str, nvrtc.getVersion()))
    except Exception as exc:
        return Check("NVRTC", False, f"cannot compile {PROBE_KERNEL} for {arch} "
                                     f"({_lines(exc)})")
    return Check("NVRTC", True, f"NVRTC {version} compiled {PROBE_KERNEL} for {arch} in "
                                f"{time.monotonic() - began:.1f} s")


def preflight(mode: str) -> int:
    """Every check, the launcher's running while CuPy and NVRTC are tried; ok lines, then
    one line naming everything missing (exit 3) or the time it took (exit 0)."""
    began = time.monotonic()
    print(f"preflight: {python_line()}", flush=True)
    launch = launch_prefix()
    checks = [check_mpi_library()]
    probe = None
    if checks[0].ok:
        started = start_launcher_probe(launch)
        if isinstance(started, Check):
            checks.append(started)
        else:
            probe = started
    elif not launch:
        checks.append(Check("launcher", False, "no mpiexec or mpirun on PATH"))
    gpu, compute_capability = check_gpu(mode)
    checks.append(gpu)
    if gpu.ok:
        checks.append(check_nvrtc(mode, compute_capability))
    if probe is not None:
        limit = LAUNCH_TIMEOUT * (3 if mode == "cpu" else 1)
        checks.insert(1, finish_launcher_probe(probe, launch, began, limit))
    for check in checks:
        if check.ok:
            print(f"preflight: {check.name} ok: {check.detail}", flush=True)
    failed = [check for check in checks if not check.ok]
    if failed:
        print("gpu-check: preflight failed: "
              + "; ".join(f"{check.name}: {check.detail}" for check in failed), flush=True)
        return 3
    print(f"preflight: passed in {time.monotonic() - began:.1f} s", flush=True)
    return 0


# --- kernels and facts -------------------------------------------------------------------

def compile_kernels(mode: str) -> int:
    """Every kernel source into the cache for the device's target (sm_90a in --cpu mode),
    then, on the GPU, the fused kernels loaded as a run loads them."""
    from ..backend.kernels import load_kernels, precompile
    from ..backend.kernels.compile import cache_dir, device_arch

    arch = "sm_90a"
    if mode == "gpu":
        import cupy

        arch = device_arch(cupy.cuda.Device(0).compute_capability)
    print(f"kernel cache: {cache_dir()}")
    for name, seconds, compiled in precompile(arch):
        print(f"  {name} for {arch}: {'compiled' if compiled else 'found'} in {seconds:.1f} s")
    if mode == "gpu":
        kernels, reason = load_kernels()
        print(f"on the GPU: {reason}")
        return 0 if kernels is not None else 1
    return 0


def facts(backend_name: str, facts_json: str) -> int:
    """Versions, the device, the MPI library, the bf16 census; the key facts as JSON (for
    the summary)."""
    record: dict = {"python": platform.python_version(), "platform": platform.platform()}

    def line(name, fn):
        """Print one fact; record it (None when unavailable: the printed line says why)."""
        try:
            record[name] = fn()
            print(f"{name}: {record[name]}", flush=True)
        except Exception as exc:
            record[name] = None
            print(f"{name}: unavailable ({type(exc).__name__}: {_lines(exc, 1)})", flush=True)

    print(f"python {record['python']} on {record['platform']}")
    line("numpy", lambda: _version("numpy"))
    line("ml_dtypes", lambda: _version("ml_dtypes"))

    def mpi():
        import mpi4py
        from mpi4py import MPI

        return f"mpi4py {mpi4py.__version__}; {MPI.Get_library_version().splitlines()[0].strip()}"

    line("mpi", mpi)

    def device():
        import cupy

        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        free, total = rt.memGetInfo()
        record["device_name"] = name
        return (f"cupy {cupy.__version__}, CUDA runtime {rt.runtimeGetVersion()}, driver "
                f"{rt.driverGetVersion()}, {rt.getDeviceCount()} device(s), device 0 {name} "
                f"sm_{props['major']}{props['minor']}, {free / 2**30:.1f}/{total / 2**30:.1f} "
                "GiB free")

    line("cupy", device)

    def nvrtc():
        from cupy.cuda import nvrtc as module

        return ".".join(map(str, module.getVersion()))

    line("nvrtc", nvrtc)

    def nccl():
        from cupy.cuda import nccl as module

        if not getattr(module, "available", True):
            return "not available (cupy.cuda.nccl.available is False: libnccl not loaded)"
        return f"NCCL {module.get_version()}"

    line("nccl", nccl)

    def cublas():
        import cupy

        return f"cuBLAS {cupy.cuda.cublas.getVersion(cupy.cuda.device.get_cublas_handle())}"

    line("cublas", cublas)

    def torch_facts():
        import torch

        return (f"torch {torch.__version__}, cuda available {torch.cuda.is_available()}"
                + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))

    line("torch (peer only)", torch_facts)
    try:
        from ..backend import kernels  # noqa: F401  (registers the fused kernels with the backend)
        from ..backend.array import Backend, bf16_census, choose_backend
        from ..parallel.transport import mpi_library

        library = mpi_library()
        record["mpi_cuda_aware"] = f"{library.cuda_aware} ({library.cuda_reason})"
        print(f"MPI CUDA-aware: {record['mpi_cuda_aware']}; libmpi {library.path}")
        bk = Backend(choose_backend(backend_name), "bfloat16")
        record["backend"] = f"{bk.name}: {bk.choice.reason}"
        record["kernels"] = bk.kernels_reason
        record["matmul_path"] = bk.matmul_path
        print(f"backend {record['backend']}; kernels: {bk.kernels_reason}")
        census = bf16_census(bk)
        record["bf16_census"] = census
        print(f"bf16 census ({bk.name}):")
        for op, status in census.items():
            print(f"  {op:<32} {status}")
        print(f"matmul path: {bk.matmul_path}")
    except Exception as exc:       # reported, and the stage fails
        print(f"backend facts failed: {type(exc).__name__}: {_lines(exc)}")
        _write_json(facts_json, record)
        return 1
    _write_json(facts_json, record)
    return 0


# --- runs under the launcher ----------------------------------------------------------------

def run_command(cmd: list[str], timeout: float | None = None) -> tuple[int | None, str, float]:
    """``(exit status or None when it timed out or could not start, what it printed or
    why, seconds)``. The command runs in its own process group, killed whole after
    ``timeout`` seconds (default :func:`run_timeout`), mpiexec's ranks too."""
    timeout = run_timeout() if timeout is None else timeout
    print(f"$ {shlex.join(cmd)}", flush=True)
    began = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    except OSError as exc:        # FileNotFoundError for a missing launcher, and the like
        return None, f"cannot start {cmd[0]}: {exc.strerror or exc}", 0.0
    _running[proc.pid] = proc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        seconds = time.monotonic() - began
        print((out or "")[-3000:], flush=True)
        return None, f"timed out after {timeout:.0f} s", seconds
    finally:
        _running.pop(proc.pid, None)
    seconds = time.monotonic() - began
    print(f"  [{seconds:.1f} s, exit {proc.returncode}]", flush=True)
    if proc.returncode != 0:
        print(out[-3000:], flush=True)
    return proc.returncode, out, seconds


def ranks_command(ranks: int, argv: list[str]) -> list[str] | str:
    """``argv`` (a python command) under the launcher at ``ranks`` ranks, or why not."""
    if ranks == 1:
        return argv
    launch = launch_prefix()
    if not launch:
        return "no MPI launcher (mpiexec or mpirun) on PATH"
    return [*launch, str(ranks), *argv]


def _failure(status: int | None, output: str) -> str:
    if status is None:
        return output
    last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return f"exit {status}: {last[0].strip()[:200]}"


def _write_json(path: str, data) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


CASES = [("tiny", "bfloat16"), ("tiny", "float32"), ("small", "bfloat16")]


def compare(work: str, out_json: str, backend: str) -> int:
    """spmd-moe run on ``backend`` at 1 then 2 ranks (mpi-host) against a NumPy run per
    case. compare.json is rewritten after every run, so a stage cut short keeps what it
    measured; the 2-rank runs come last, so a launcher problem cannot hide the 1-rank
    results."""
    import numpy as np

    from ..engine.testing import TOLERANCE, relative_error

    results: list[dict] = []
    reference: dict = {}

    def run(tag, ranks, preset, dtype, backend_name, transport):
        path = os.path.join(work, f"{tag}.npz")
        cmd = ranks_command(ranks, [sys.executable, "-m", "spmd_moe", "run", "--preset",
                                    preset, "--dtype", dtype, "--backend", backend_name,
                                    "--transport", transport, "--output", path])
        if isinstance(cmd, str):
            return None, cmd, 0.0
        status, output, seconds = run_command(cmd)
        if status != 0:
            return None, _failure(status, output), seconds
        return dict(np.load(path)), "", seconds

    def save():
        ok = len(results) == 2 * len(CASES) and all(r["ok"] for r in results)
        _write_json(out_json, {"backend": backend, "against": "numpy", "cases": results,
                               "ok": ok})
        return ok

    for ranks in (1, 2):
        for preset, dtype in CASES:
            row = {"preset": preset, "dtype": dtype, "ranks": ranks, "backend": backend,
                   "transport": "mpi-host"}
            if (preset, dtype) not in reference:
                reference[preset, dtype] = run(f"{preset}-{dtype}-numpy", 1, preset, dtype,
                                               "numpy", "auto")
            want, why, _ = reference[preset, dtype]
            got, error, seconds = run(f"{preset}-{dtype}-{backend}-{ranks}", ranks, preset,
                                      dtype, backend, "mpi-host")
            row["seconds"] = round(seconds, 1)
            problems = ([f"numpy run: {why}"] if want is None else []) + (
                [error] if got is None else [])
            if problems:
                row.update(ok=False, error="; ".join(problems))
            else:
                tolerance = TOLERANCE[dtype]
                for key in ("hidden", "logits"):
                    row[f"{key}_rel_err"] = relative_error(got[key], want[key])
                same = bool(np.array_equal(got["expert_counts"], want["expert_counts"]))
                row.update(expert_counts_identical=same, tolerance=tolerance,
                           expert_counts_differing=int(np.count_nonzero(
                               got["expert_counts"] != want["expert_counts"])))
                # bf16 near-ties may route a token differently; float32 must not.
                row["ok"] = bool(row["hidden_rel_err"] <= tolerance
                                 and row["logits_rel_err"] <= tolerance
                                 and (same or dtype != "float32")
                                 and got["expert_counts"].sum() == want["expert_counts"].sum())
            results.append(row)
            save()
    ok = save()
    print(format_compare(results))
    return 0 if ok else 1


def format_compare(results: list[dict]) -> str:
    lines = [f"{'preset':<7}{'dtype':<10}{'ranks':>6}{'hidden err':>12}{'logits err':>12}"
             f"{'counts':>10}  result"]
    for r in results:
        if "hidden_rel_err" in r:
            counts = ("same" if r["expert_counts_identical"]
                      else f"{r['expert_counts_differing']} diff")
            lines.append(f"{r['preset']:<7}{r['dtype']:<10}{r['ranks']:>6}"
                         f"{r['hidden_rel_err']:>12.2e}{r['logits_rel_err']:>12.2e}"
                         f"{counts:>10}  {'ok' if r['ok'] else 'FAIL'}")
        else:
            lines.append(f"{r['preset']:<7}{r['dtype']:<10}{r['ranks']:>6}  FAIL: {r['error']}")
    return "\n".join(lines)


TRANSPORT_SIZES = {"gpu": ["--seqs", "1", "--seq-len", "8192"],
                   "cpu": ["--seqs", "2", "--seq-len", "64", "--d-model", "64",
                           "--experts", "4"]}


def transport(work: str, out_json: str, backend: str, mode: str) -> int:
    """``spmd-moe bench --transport-only`` over mpi-host at 2 and 4 ranks; transport.json
    holds both results (rewritten after each)."""
    results: dict = {}
    ok = True
    for ranks in (2, 4):
        path = os.path.join(work, f"transport-{ranks}.json")
        cmd = ranks_command(ranks, [sys.executable, "-m", "spmd_moe", "bench",
                                    "--transport-only", "--backend", backend, "--transport",
                                    "mpi-host", *TRANSPORT_SIZES[mode], "--iters", "3",
                                    "--warmup", "1", "--quiet", "--json", path])
        if isinstance(cmd, str):
            results[str(ranks)] = {"ok": False, "error": cmd}
        else:
            status, output, _ = run_command(cmd)
            if status == 0:
                with open(path) as handle:
                    results[str(ranks)] = {"ok": True, **json.load(handle)}
                print("\n".join(output.strip().splitlines()[-8:]))
            else:
                results[str(ranks)] = {"ok": False, "error": _failure(status, output)}
        ok = ok and results[str(ranks)]["ok"] and results[str(ranks)].get("roundtrip_ok", False)
        _write_json(out_json, results)
    return 0 if ok else 1


# --- the decode step against its bandwidth floor ----------------------------------------------

def copy_bandwidth(mode: str) -> tuple[float, str]:
    """``(GB/s, how)``: bytes read plus bytes written per second of a large device-to-device
    copy (CuPy, 2 GiB, median of 10) on the GPU; of a NumPy copy of 256 MiB in --cpu mode."""
    import numpy as np

    if mode == "gpu":
        import cupy

        nbytes = 2 << 30
        src = cupy.empty(nbytes, dtype=np.uint8)
        src.fill(1)
        dst = cupy.empty_like(src)
        runtime = cupy.cuda.runtime
        stream = cupy.cuda.get_current_stream()
        times = []
        for i in range(13):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                runtime.memcpyDeviceToDevice, stream.ptr)
            stop.record()
            stop.synchronize()
            if i >= 3:
                times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        del src, dst
        cupy.get_default_memory_pool().free_all_blocks()
        return 2 * nbytes / float(np.median(times)) / 1e9, \
            "device-to-device copy of 2 GiB (CuPy), read + write, median of 10"
    nbytes = 256 << 20
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(5):
        began = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - began)
    return 2 * nbytes / float(np.median(times)) / 1e9, \
        "host copy of 256 MiB (NumPy), read + write, median of 5"


def decode_floor(config_args: list[str], new_tokens: int, gbps: float) -> dict:
    """The decode-step bytes and floor of rank 0 for the config, world size 1: the numbers
    ``spmd-moe plan --workload decode`` prints (plan.format_plan), from the same function."""
    from ..commands.cli import build_parser, config_from_args
    from ..core.costs import decode_step_bytes
    from ..commands.plan import make_plan
    from ..core.topology import Grid

    args = build_parser().parse_args(["plan", *config_args, "--world-size", "1",
                                      "--workload", "decode", "--new-tokens",
                                      str(new_tokens)])
    config = config_from_args(args)
    layout, _ = make_plan(config, 1, args.layout or config.layout)
    context = config.workload.seq_len + config.workload.new_tokens
    step = decode_step_bytes(config, Grid(layout, config.model, 0), context)
    total = sum(step.values())
    return {"bytes": step, "total_gb": total / 1e9, "context": context,
            "floor_ms": total / (gbps * 1e9) * 1e3, "gbps": gbps,
            "floor_ms_at_h200_datasheet": total / (H200_DATASHEET_GBPS * 1e9) * 1e3}


def decode(work: str, out_json: str, backend: str, mode: str) -> int:
    """A decode run beside its bandwidth floor: the copy bandwidth, ``spmd-moe plan`` (its
    text, at that bandwidth), then ``spmd-moe run --workload decode``; decode.json."""
    config_args = DECODE_CONFIG[mode]
    new_tokens = DECODE_NEW_TOKENS[mode]
    workload = ["--workload", "decode", "--new-tokens", str(new_tokens)]
    result: dict = {"config": config_args + workload, "backend": backend, "ok": False}
    try:
        gbps, how = copy_bandwidth(mode)
    except Exception as exc:
        print(f"copy bandwidth: failed ({type(exc).__name__}: {_lines(exc)})")
        _write_json(out_json, {**result, "error": f"copy bandwidth: {_lines(exc)}"})
        return 1
    result["copy_gbps"], result["copy_how"] = gbps, how
    print(f"copy bandwidth: {gbps:.0f} GB/s ({how})")
    memory = ["--device-memory", "141"] if mode == "gpu" else []
    status, output, _ = run_command([sys.executable, "-m", "spmd_moe", "plan", *config_args,
                                     *workload, "--world-size", "1", "--hbm-gbps",
                                     f"{gbps:.0f}", *memory])
    print(output)
    result["plan_output"] = output
    result["floor"] = decode_floor(config_args, new_tokens, gbps)
    report = os.path.join(work, "decode-report.json")
    status, output, seconds = run_command([sys.executable, "-m", "spmd_moe", "run",
                                           *config_args, *workload, "--backend", backend,
                                           "--report", report],
                                          timeout=2.5 * run_timeout())
    result["seconds"] = round(seconds, 1)
    if status != 0:
        result["error"] = _failure(status, output)
        _write_json(out_json, result)
        return 1
    print("\n".join(output.strip().splitlines()[-20:]))
    with open(report) as handle:
        run = json.load(handle)
    per_token = run["decode"]["per_token_ms"]
    result.update(ok=True, decode=run["decode"], per_token_ms=per_token,
                  ratio_to_floor=per_token["mean"] / result["floor"]["floor_ms"],
                  run_backend=run.get("backend"))
    print(f"decode step: {per_token['mean']:.3f} ms per token (p50 {per_token['p50']:.3f}) "
          f"against a floor of {result['floor']['floor_ms']:.3f} ms "
          f"({result['floor']['total_gb']:.2f} GB at {gbps:.0f} GB/s): "
          f"{result['ratio_to_floor']:.2f}x")
    _write_json(out_json, result)
    return 0


# --- the summary -----------------------------------------------------------------------------

def _load(out: str, name: str):
    try:
        with open(os.path.join(out, name)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def pytest_outcome(log_path: str) -> dict:
    """Counts from pytest's last line and the FAILED/ERROR lines of ``-rfE``."""
    try:
        with open(log_path) as handle:
            lines = [line.rstrip() for line in handle if line.strip()]
    except OSError:
        return {"ran": False}
    counts = {}
    for line in reversed(lines):
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                           line)
        if found:
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                      for n, kind in found}
            break
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return {"ran": True, "counts": counts, "failures": failures,
            "last": lines[-1] if lines else ""}


def _ms(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _ratio(value) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "n/a"


def summary_markdown(out: str, stages: list[tuple[str, str, str]], facts_record: dict,
                     seconds: str, mode: str, command: str, date: str) -> str:
    """The section for docs/PERFORMANCE.md, from the files under ``out``."""
    device = facts_record.get("device_name") or "unknown GPU"
    title = (f"## Measured on the {device.replace('NVIDIA ', '')} ({date})" if mode == "gpu"
             else f"## bin/gpu-check --cpu rehearsal ({date}): NumPy backend, not a GPU "
                  "measurement")
    software = [f"Python {facts_record['python']}" if facts_record.get("python") else None,
                f"NumPy {facts_record['numpy']}" if facts_record.get("numpy") else None,
                facts_record.get("mpi"),
                f"NVRTC {facts_record['nvrtc']}" if facts_record.get("nvrtc") else None,
                facts_record.get("nccl"), facts_record.get("cublas"),
                facts_record.get("torch (peer only)")]
    where = (facts_record.get("cupy") or device) if mode == "gpu" else \
        f"CPU (--cpu), {facts_record.get('platform', 'platform unknown')}"
    lines = [title, "",
             f"Command: `{command}`, {seconds} s in all. Device: {where}.",
             "Software: " + ("; ".join(item for item in software if item) or "unknown")
             + ".",
             f"Fused kernels: {facts_record.get('kernels', '?')}. Matmul: "
             f"{facts_record.get('matmul_path', '?')}. MPI CUDA-aware: "
             f"{facts_record.get('mpi_cuda_aware', '?')}.", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {used} |" for name, status, used in stages]

    tests = pytest_outcome(os.path.join(out, "pytest-gpu.log"))
    lines += ["", "### GPU tests (`python -m pytest -m gpu tests`)", ""]
    if tests["ran"]:
        counts = tests["counts"]
        lines.append(", ".join(f"{n} {kind}" for kind, n in counts.items()) or tests["last"])
        lines += [f"- {line}" for line in tests["failures"][:30]]
    else:
        lines.append("not run")

    compare_result = _load(out, "compare.json")
    lines += ["", "### CuPy against NumPy (`spmd-moe run`, relative Frobenius error)", ""]
    if compare_result:
        lines += ["| preset | dtype | ranks | hidden | logits | expert counts | result |",
                  "|---|---|---|---|---|---|---|"]
        for r in compare_result["cases"]:
            if "hidden_rel_err" in r:
                counts = ("identical" if r["expert_counts_identical"]
                          else f"{r['expert_counts_differing']} differ")
                lines.append(f"| {r['preset']} | {r['dtype']} | {r['ranks']} | "
                             f"{r['hidden_rel_err']:.2e} | {r['logits_rel_err']:.2e} | {counts} "
                             f"| {'ok' if r['ok'] else 'FAIL'} (tolerance {r['tolerance']:g}) |")
            else:
                lines.append(f"| {r['preset']} | {r['dtype']} | {r['ranks']} | - | - | - | "
                             f"FAIL: {r['error']} |")
    else:
        lines.append("not run")

    bench_result = _load(out, "bench.json")
    lines += ["", "### Layer step, one rank's share at paper shapes (`spmd-moe bench`)", ""]
    if bench_result:
        lines += _bench_lines(bench_result)
    else:
        lines.append("not run")

    transport_result = _load(out, "transport.json")
    lines += ["", "### Dispatch + combine against a raw Alltoallv of the same bytes", ""]
    if transport_result:
        lines += ["| ranks | transport | tokens per rank | dispatch + combine ms | raw "
                  "Alltoallv x2 ms | ratio (SPEC: <= 1.2x) | rows intact |",
                  "|---|---|---|---|---|---|---|"]
        for ranks, r in transport_result.items():
            if r.get("ok"):
                lines.append(f"| {ranks} | {r['transport']['name']} | "
                             f"{r['shape']['tokens_per_rank']} | "
                             f"{_ms(r['dispatch_combine_ms']['mean'])} | "
                             f"{_ms(r['raw_alltoallv_ms']['mean'])} | {_ratio(r['ratio'])} | "
                             f"{'yes' if r['roundtrip_ok'] else 'NO'} |")
            else:
                lines.append(f"| {ranks} | - | - | - | - | - | FAIL: {r.get('error')} |")
        lines.append("")
        lines.append("Ranks share one GPU over mpi-host (pinned host staging): this measures "
                     "the staging and the host MPI, not a network.")
    else:
        lines.append("not run")

    decode_result = _load(out, "decode.json")
    lines += ["", "### Decode step against the memory-bandwidth floor", ""]
    if decode_result and decode_result.get("ok"):
        floor = decode_result["floor"]
        per_token = decode_result["per_token_ms"]
        lines += [f"`spmd-moe run {' '.join(decode_result['config'])}` at 1 rank: "
                  f"{_ms(per_token['mean'])} ms per token (p50 {_ms(per_token['p50'])}, p99 "
                  f"{_ms(per_token['p99'])}), time to first token "
                  f"{_ms(decode_result['decode']['ttft_ms'])} ms.",
                  f"Floor (`spmd-moe plan`, same config): {floor['total_gb']:.2f} GB per step ("
                  + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in floor["bytes"].items())
                  + f") at the measured {floor['gbps']:.0f} GB/s ({decode_result['copy_how']}) "
                  f"= {_ms(floor['floor_ms'])} ms; measured / floor = "
                  f"**{_ratio(decode_result['ratio_to_floor'])}** (at the "
                  f"{H200_DATASHEET_GBPS:.0f} GB/s datasheet: "
                  f"{_ms(floor['floor_ms_at_h200_datasheet'])} ms)."]
    elif decode_result:
        lines.append(f"FAIL: {decode_result.get('error')}")
    else:
        lines.append("not run")
    return "\n".join(lines) + "\n"


def _bench_lines(bench_result: dict) -> list[str]:
    shape = bench_result["shape"]
    peer = bench_result.get("peer", {})
    peer_ms = {k: v["mean"] for k, v in peer.get("phases_ms", {}).items()}
    lines = [f"{shape['seqs']} x {shape['seq_len']} tokens, d {shape['d_model']}, "
             f"{shape['heads']} heads, F {shape['d_ff']}, {shape['expert_rows']} expert rows, "
             f"{shape['dtype']}; {bench_result['iterations']} timed iterations after "
             f"{bench_result['warmup']} warm-up; peak {bench_result['peak']['tflops']:.4g} "
             f"TFLOP/s ({bench_result['peak']['source']}).", "",
             "| phase | ms | TFLOP/s | MFU |", "|---|---|---|---|"]
    rows = [(p, st) for p, st in bench_result["phases_ms"].items()] + [
        ("attention", bench_result["attention_ms"]), ("step", bench_result["step_ms"])]
    for name, st in rows:
        tflops = bench_result["tflops"].get(name)
        mfu = bench_result["mfu"].get(name)
        lines.append(f"| {name} | {_ms(st['mean'])} | "
                     + (f"{tflops:.4g} | {mfu * 100:.1f}% |" if tflops is not None else "- | - |"))
    tiles = bench_result.get("attention_tiles", {})
    lines.append("")
    if tiles.get("available"):
        lines.append("Attention core by tile height, same inputs: " + ", ".join(
            f"{rows} queries {_ms(st['mean'])} ms ({tiles['tflops'][rows]:.4g} TFLOP/s)"
            for rows, st in tiles["ms"].items())
            + f"; the schedule picks {tiles['chosen']}; outputs "
            + ("identical." if tiles["outputs_identical"]
               else f"differ (relative {tiles['outputs_max_rel_diff']:.2g})."))
    elif tiles:
        lines.append(f"Attention tile heights: not timed ({tiles.get('reason')}).")
    if peer.get("available"):
        lines.append(f"PyTorch {peer['torch']} in the same run (ms): " + ", ".join(
            f"{k} {_ms(v)}" for k, v in peer_ms.items())
            + ("; failed: " + "; ".join(f"{k}: {v}" for k, v in peer["errors"].items())
               if peer.get("errors") else "") + ".")
    else:
        lines.append(f"PyTorch peer: not run ({peer.get('reason')}).")
    lines += ["", "| SPEC §7 target | ours ms | reference | reference ms | ratio | required | aim "
              "| status |", "|---|---|---|---|---|---|---|---|"]
    for row in bench_result.get("targets", []):
        required = f"<= {row['required']:.2f}x" if row["required"] is not None else "-"
        lines.append(f"| {row['name']} | {_ms(row['ours_ms'])} | {row['reference']} | "
                     f"{_ms(row['reference_ms'])} | {_ratio(row.get('ratio'))} | {required} | "
                     f"<= {row['aim']:.2f}x | {row['status']} |")
    return lines


def summary(out: str, stages_path: str, facts_json: str, seconds: str, mode: str) -> int:
    """Write summary.md under ``out`` and print it."""
    stages = []
    with open(stages_path) as handle:
        for line in handle.read().splitlines():
            if line:
                name, status, used = line.split("|")
                stages.append((name, status, used))
    record = _load(os.path.dirname(facts_json) or ".", os.path.basename(facts_json)) or {}
    command = os.environ.get("GPU_CHECK_COMMAND", "bin/gpu-check")
    text = summary_markdown(out, stages, record, seconds, mode, command,
                            time.strftime("%Y-%m-%d", time.gmtime()))
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(text)
    print(text)
    return 0


# --- entry point -----------------------------------------------------------------------------

STEPS = {
    "preflight": (preflight, 1),
    "compile": (compile_kernels, 1),
    "facts": (facts, 2),
    "compare": (compare, 3),
    "transport": (transport, 4),
    "decode": (decode, 4),
    "summary": (summary, 5),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STEPS or len(argv) - 1 != STEPS[argv[0]][1]:
        print(f"usage: python -m spmd_moe.tools.gpucheck {{{'|'.join(STEPS)}}} ARGS "
              "(run by bin/gpu-check)", file=sys.stderr)
        return 2
    step, _ = STEPS[argv[0]]
    signal.signal(signal.SIGTERM, _stop_children)
    try:
        return step(*argv[1:])
    except Exception as exc:       # the boundary: one line, never a traceback
        print(f"gpu-check: {argv[0]} failed: {type(exc).__name__}: {_lines(exc, 3)}",
              flush=True)
        return 3 if argv[0] == "preflight" else 1


if __name__ == "__main__":
    sys.exit(main())
