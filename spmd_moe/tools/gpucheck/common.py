"""What the steps of bin/gpu-check share: the launch prefix and time limits, running a
command (in its own process group, so a timeout ends mpiexec with its ranks), and one-line
failure text."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import time

H200_DATASHEET_GBPS = 4800.0
# Commands a step started, each in a process group of its own (so that a timeout can end
# mpiexec with its ranks): keyed by pid, which is also the group id.
running: dict[int, subprocess.Popen] = {}
# The launch prefix (``mpiexec -n``, with Open MPI's flags where needed) comes from
# bin/gpu-check in $GPU_CHECK_LAUNCH, shell-quoted, the rank count to be appended.
LAUNCH_ENV = "GPU_CHECK_LAUNCH"


# Seconds for `mpiexec -n 2 python -c ...` in the preflight (three times that with --cpu,
# which runs on busy 2-core machines: the preflight's own limit is 20 s, or 45 s there).
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


def stop_children(signum, frame) -> None:
    """SIGTERM, from the stage's timeout: it signals the stage's process group, which the
    commands started here left. End them, then this step."""
    for pid in list(running):
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


def first_lines(exc: BaseException, count: int = 2) -> str:
    text = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(text[:count]) or type(exc).__name__


def distribution_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


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
    running[proc.pid] = proc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        seconds = time.monotonic() - began
        print((out or "")[-3000:], flush=True)
        return None, f"timed out after {timeout:.0f} s", seconds
    finally:
        running.pop(proc.pid, None)
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


def failure_line(status: int | None, output: str) -> str:
    if status is None:
        return output
    last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return f"exit {status}: {last[0].strip()[:200]}"


def write_json(path: str, data) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
