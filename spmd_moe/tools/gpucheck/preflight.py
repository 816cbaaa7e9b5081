"""``preflight MODE``: the few seconds before anything costly. Each check (the Python
packages the check imports are there, the MPI library loads, a launcher starts 2 ranks that
see each other, CuPy sees the GPU, NVRTC compiles one kernel) is a :class:`Check`, timed;
any failure is one line naming everything missing. Nothing here imports a package before
the packages check has found it."""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from .common import (LAUNCH_TIMEOUT, PROBE_KERNEL, RANKS_PROBE, distribution_version, first_lines,
                     launch_prefix, running)


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
        version = distribution_version(name)
        if version is not None:
            found.append(f"{name} {version}")
        elif name in ("mpi4py", "pytest", "pytest-mpi", "torch"):
            found.append(f"{name} not installed")
    return "; ".join(found)


# What the check's steps import (beyond mpi4py, checked on its own), and what needs it. The
# GPU image has them (docs/GPU.md lists its packages); elsewhere their wheels travel.
PACKAGES = (("numpy", "every step"), ("ml_dtypes", "the backend's bfloat16"),
            ("pytest", "the gpu tests stage"), ("safetensors", "the checkpoint tests"),
            ("tokenizers", "the tokenizer tests"))


def check_python_packages(find_spec=importlib.util.find_spec) -> Check:
    """The packages of :data:`PACKAGES` are importable (found, not imported)."""
    missing = [f"{name} ({why})" for name, why in PACKAGES if find_spec(name) is None]
    if missing:
        return Check("Python packages", False,
                     f"missing {', '.join(missing)}: carry their wheels (--wheels, docs/GPU.md)")
    return Check("Python packages", True, ", ".join(
        f"{name} {distribution_version(name.replace('_', '-')) or distribution_version(name)}"
        for name, _ in PACKAGES))


def check_mpi_library() -> Check:
    """mpi4py loads a libmpi (without initialising MPI in this process)."""
    try:
        import mpi4py
    except Exception as exc:
        return Check("MPI library", False, f"mpi4py is not importable ({first_lines(exc)})")
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
                     f"mpi4py {mpi4py.__version__} cannot load libmpi ({first_lines(exc, 3)}; "
                     f"{searched}); carry the mpich wheel: bin/gpu-check --wheels .whl "
                     "(docs/GPU.md)")
    try:
        from ...parallel.transport import loaded_libmpi_path

        where = loaded_libmpi_path() or "path unknown"
    except ImportError:                  # a missing package: the packages check names it
        where = "path not asked"
    return Check("MPI library", True, f"{version} ({where}, mpi4py {mpi4py.__version__})")


def start_launcher_probe(launch: list[str]):
    """Start ``launch 2 python -c RANKS_PROBE`` in its own process group; a Check if it
    cannot start."""
    if not launch:
        return Check("launcher", False, "no mpiexec or mpirun on PATH")
    try:
        proc = subprocess.Popen([*launch, "2", sys.executable, "-c", RANKS_PROBE],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        running[proc.pid] = proc
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
        running.pop(proc.pid, None)
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
    from ...backend.array import probe_cupy

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
        return Check("GPU", False, f"CuPy cannot use device 0 ({first_lines(exc)})"), None
    if int(cc) < 80:
        detail += "; the fused kernels need sm_80 (the generic CuPy code will run)"
    return Check("GPU", True, detail), cc


def check_nvrtc(mode: str, compute_capability: str | None) -> Check:
    """NVRTC compiles the smallest kernel source for the device (sm_90a in --cpu mode)."""
    from ...backend.kernels.compile import compile_source, device_arch

    arch = device_arch(compute_capability) if compute_capability else "sm_90a"
    try:
        from cupy.cuda import nvrtc
    except Exception as exc:
        if mode == "cpu":
            return Check("NVRTC", True, f"skipped: CuPy is not importable ({first_lines(exc, 1)}; "
                                        "--cpu)")
        return Check("NVRTC", False, f"cupy.cuda.nvrtc is not importable ({first_lines(exc)})")
    began = time.monotonic()
    try:
        compile_source(PROBE_KERNEL, arch)
        version = ".".join(map(str, nvrtc.getVersion()))
    except Exception as exc:
        return Check("NVRTC", False, f"cannot compile {PROBE_KERNEL} for {arch} "
                                     f"({first_lines(exc)})")
    return Check("NVRTC", True, f"NVRTC {version} compiled {PROBE_KERNEL} for {arch} in "
                                f"{time.monotonic() - began:.1f} s")


def timed(check, *args):
    """``check(*args)``, its seconds added to its detail (what a preflight cap needs)."""
    began = time.monotonic()
    result = check(*args)
    found = result[0] if isinstance(result, tuple) else result
    found.detail += f" [{time.monotonic() - began:.1f} s]"
    return result


def preflight(mode: str) -> int:
    """Every check, the launcher's running while CuPy and NVRTC are tried; ok lines, then
    one line naming everything missing (exit 3) or the time it took (exit 0)."""
    began = time.monotonic()
    print(f"preflight: {python_line()}", flush=True)
    launch = launch_prefix()
    packages = timed(check_python_packages)
    checks = [packages, timed(check_mpi_library)]
    probe = None
    if checks[1].ok:
        started = start_launcher_probe(launch)
        if isinstance(started, Check):
            checks.append(started)
        else:
            probe = started
    elif not launch:
        checks.append(Check("launcher", False, "no mpiexec or mpirun on PATH"))
    if packages.ok:
        gpu, compute_capability = timed(check_gpu, mode)
        checks.append(gpu)
        if gpu.ok:
            checks.append(timed(check_nvrtc, mode, compute_capability))
    if probe is not None:
        limit = LAUNCH_TIMEOUT * (3 if mode == "cpu" else 1)
        checks.insert(2, finish_launcher_probe(probe, launch, began, limit))
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
