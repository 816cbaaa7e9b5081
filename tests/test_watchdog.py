"""Interrupts and stalls end the whole job, soon, with one line saying why (watchdog.py).

Every job runs under mpiexec in its own process group and is waited for with a bounded
wait; on expiry the whole group is killed (SIGKILL), so no test can hang CI. A rank that
sleeps, stops itself or signals itself is injected with ``SPMD_MOE_FAULT``; the fault says
so on stderr first (with the rank's pid), which is the moment a test acts on.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from spmd_moe.commands.report import slow_iterations
from spmd_moe.parallel.watchdog import EXIT_STALL, Watchdog, ranks_text

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


class Job:
    """``mpiexec -n N python -m spmd_moe ARGS`` in a new process group."""

    def __init__(self, *args, ranks=4, fault=None, cwd=None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SPMD_MOE_FAULT", None)
        if fault:
            env["SPMD_MOE_FAULT"] = fault
        self.err_path = os.path.join(cwd or os.getcwd(), f".job-{os.getpid()}-{id(self)}.err")
        self.err = open(self.err_path, "w+")
        self.proc = subprocess.Popen([MPIEXEC, "-n", str(ranks), sys.executable, "-m",
                                      "spmd_moe", *args], stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, env=env, cwd=cwd,
                                     start_new_session=True)
        self.start = time.monotonic()

    def stderr(self) -> str:
        self.err.flush()
        with open(self.err_path) as handle:
            return handle.read()

    def wait_for(self, text: str, limit: float = 120) -> str:
        """Wait until stderr holds ``text``; returns that line."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for line in self.stderr().splitlines():
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"never saw {text!r}:\n{self.stderr()}")

    def finish(self, limit: float) -> tuple[int, float, str, str]:
        """(exit status, seconds since the last mark, stdout, stderr); the job is killed
        (and the test fails) if it is still running after ``limit`` seconds."""
        mark = time.monotonic()
        try:
            stdout, _ = self.proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job was still running after {limit} s:\n{self.stderr()}")
        took = time.monotonic() - mark
        text = self.stderr()
        self.err.close()
        os.unlink(self.err_path)
        return self.proc.returncode, took, stdout, text

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def rank_pids(job: Job) -> dict[int, int]:
    """World rank -> pid of the job's rank processes (Hydra sets PMI_RANK)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    ranks = {}
    for pid in parents:
        ancestor = pid
        while ancestor in parents and ancestor != job.proc.pid:
            ancestor = parents[ancestor]
        if ancestor != job.proc.pid or pid == job.proc.pid:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                values = dict(item.split(b"=", 1) for item in environ.read().split(b"\0")
                              if b"=" in item)
        except OSError:
            continue
        if b"PMI_RANK" in values and b"spmd_moe" in open(f"/proc/{pid}/cmdline", "rb").read():
            ranks[int(values[b"PMI_RANK"])] = pid
    return ranks


def gone(pid: int) -> bool:
    """Not running: absent, or a zombie (an init that does not reap leaves those)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def all_gone(pids, within: float = 10.0) -> bool:
    """Every pid is gone, at the latest ``within`` seconds from now (a killed process may
    take a moment to die after mpiexec has returned)."""
    deadline = time.monotonic() + within
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("spmd-moe: error:")]


def check_one_line(stderr: str, *needles: str) -> str:
    lines = errors(stderr)
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in stderr, stderr
    return lines[0]


# --- signals ---------------------------------------------------------------------------

def test_ctrl_c_ends_the_job_while_ranks_are_blocked_in_mpi(tmp_path):
    # Rank 1 sleeps in Python; ranks 0, 2, 3 wait in a C-level Alltoall, where no Python
    # signal handler runs. Ctrl-C (SIGINT to mpiexec, forwarded to every rank) must still
    # end the job at once, with one line.
    out = tmp_path / "out.npz"
    job = Job("run", "--preset", "tiny", "--stall-timeout", "0", "--output", str(out),
              fault="1:1:sleep:120", cwd=tmp_path)
    job.wait_for("SPMD_MOE_FAULT: rank 1")
    time.sleep(1.0)                                    # the others reach the Alltoall
    os.kill(job.proc.pid, signal.SIGINT)
    status, took, _, stderr = job.finish(limit=30)
    assert status == 128 + signal.SIGINT, stderr
    check_one_line(stderr, "interrupted: rank 0 got SIGINT", "ending the job")
    assert took < 15 and not out.exists()


def test_ctrl_c_during_a_long_run_ends_it(tmp_path):
    # The case: one Ctrl-C during 200 iterations of small left the job hanging
    # about half the time. Here it is sent during the third iteration.
    job = Job("run", "--preset", "small", "--iters", "200", "--progress", cwd=tmp_path)
    job.wait_for("iteration 2/200", limit=240)
    os.kill(job.proc.pid, signal.SIGINT)
    status, took, _, stderr = job.finish(limit=60)
    assert status == 128 + signal.SIGINT, stderr
    check_one_line(stderr, "interrupted: rank 0 got SIGINT")
    assert took < 30


def test_sigterm_to_one_rank_ends_the_job_with_one_line(tmp_path):
    job = Job("run", "--preset", "tiny", "--stall-timeout", "0", fault="3:1:sleep:120",
              cwd=tmp_path)
    job.wait_for("SPMD_MOE_FAULT: rank 3")
    pids = rank_pids(job)
    assert sorted(pids) == [0, 1, 2, 3], pids
    os.kill(pids[2], signal.SIGTERM)                    # rank 2 is blocked in MPI
    status, took, _, stderr = job.finish(limit=30)
    assert status == 128 + signal.SIGTERM, stderr
    check_one_line(stderr, "interrupted: rank 2 got SIGTERM (in count_exchange at layer 1)")
    assert took < 15
    assert all_gone(pids.values()), pids


@pytest.mark.parametrize("fault, status, message", [
    ("1:2:interrupt", 130, "interrupted: rank 1 got KeyboardInterrupt (in forward at "
                           "layer 2)"),
    ("2:1:exit", 5, "rank 2 exited (SystemExit 5) (in forward at layer 1)"),
    ("0:3:sigint", 130, "interrupted: rank 0 got SIGINT (in "),
])
def test_an_interrupt_or_exit_on_one_rank_ends_the_job(fault, status, message, tmp_path):
    # A BaseException that is not an Exception used to escape main without the abort path,
    # leaving the other ranks in their collective.
    job = Job("run", "--preset", "tiny", "--stall-timeout", "0", fault=fault, cwd=tmp_path)
    got, _, _, stderr = job.finish(limit=60)
    assert got == status, stderr
    check_one_line(stderr, message, "ending the job")


# --- stalls ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout, fault, needles", [
    # A stopped rank (a hung GPU, a dead link): its thread cannot answer either.
    ("ep=4,pp=1", "3:1:stop", ["rank 3 did not arrive within --stall-timeout 2 s",
                               "in count_exchange at layer 1", "rank 3 did not answer",
                               "waiting: ranks 1, 2 in count_exchange at layer 1"]),
    # Two stages: rank 2 waits in the dispatch of layer 3 for rank 3, stage 0 in the
    # barrier after its work.
    ("ep=2,pp=2", "3:3:stop", ["rank 3 did not arrive", "rank 2 in count_exchange at "
                                                        "layer 3"]),
    # The stage exchange: rank 3 (stage 1) waits for rank 1's hidden rows.
    ("ep=2,pp=2", "1:1:stop", ["rank 1 did not arrive", "ranks 2, 3 in stage_recv"]),
])
def test_a_stopped_rank_is_named_and_the_job_is_gone(layout, fault, needles, tmp_path):
    out = tmp_path / "out.npz"
    job = Job("run", "--preset", "tiny", "--layout", layout, "--stall-timeout", "2",
              "--output", str(out), fault=fault, cwd=tmp_path)
    job.wait_for(f"SPMD_MOE_FAULT: rank {fault[0]}")
    pids = rank_pids(job)
    status, took, _, stderr = job.finish(limit=60)
    assert status == EXIT_STALL, stderr
    check_one_line(stderr, "stall:", *needles, "aborting the job")
    assert took < 30 and not out.exists()
    assert all_gone(pids.values()), pids


@pytest.mark.parametrize("layout, fault, needles", [
    # Two micro-batches in flight: the others wait for whichever exchange completes first
    # (overlap.Flight.wait_first) or for one (Wait); both are waits the watchdog sees.
    ("ep=4,pp=1", "3:1:stop", ["rank 3 did not arrive within --stall-timeout 2 s",
                               "rank 3 did not answer", "waiting: ranks 1, 2 in "]),
    # A chunked pipeline: stage 1 waits for rank 1's chunks (stage_recv, a started receive).
    ("ep=2,pp=2", "1:1:stop", ["rank 1 did not arrive", "rank 1 did not answer",
                               "ranks 2, 3 in stage_recv"]),
    # The TP baseline: its allreduces are non-blocking too.
    ("tp=4,pp=1", "1:1:stop", ["rank 1 did not arrive", "in attn_allreduce at layer 1",
                               "waiting: ranks 2, 3 in attn_allreduce"]),
])
def test_a_stopped_rank_is_named_with_chunks_and_overlap(layout, fault, needles, tmp_path):
    out = tmp_path / "out.npz"
    job = Job("run", "--preset", "tiny", "--layout", layout, "--chunk-tokens", "3",
              "--overlap", "--stall-timeout", "2", "--output", str(out), fault=fault,
              cwd=tmp_path)
    job.wait_for(f"SPMD_MOE_FAULT: rank {fault[0]}")
    pids = rank_pids(job)
    status, took, _, stderr = job.finish(limit=60)
    assert status == EXIT_STALL, stderr
    check_one_line(stderr, "stall:", *needles, "aborting the job")
    assert took < 30 and not out.exists()
    assert all_gone(pids.values()), pids


def test_a_rank_stuck_computing_is_named_busy(tmp_path):
    job = Job("run", "--preset", "tiny", "--stall-timeout", "2", fault="2:2:sleep:100",
              cwd=tmp_path)
    status, _, _, stderr = job.finish(limit=60)
    assert status == EXIT_STALL, stderr
    check_one_line(stderr, "rank 2 did not arrive within --stall-timeout 2 s",
                   "rank 2 is busy in forward at layer 2 for")


def test_a_slow_rank_within_the_timeout_is_no_stall_and_the_report_flags_it(tmp_path):
    # Rank 0 sleeps 3 s once (iteration 1), under the default timeout and with it off: the
    # runs end normally, and the report flags iteration 1 as far slower than the others.
    for timeout in (None, "0"):
        report = tmp_path / f"report-{timeout}.json"
        args = ["run", "--preset", "tiny", "--iters", "4", "--report", str(report)]
        job = Job(*args, *(["--stall-timeout", timeout] if timeout else []),
                  fault="0:1:sleep:3", cwd=tmp_path)
        status, _, stdout, stderr = job.finish(limit=120)
        assert status == 0, stderr
        slow = json.loads(report.read_text())["slow_iterations"]
        # Iteration 1 is flagged; on a loaded machine a merely slowish one may be too, but
        # nothing near the sleep.
        assert slow[0]["iteration"] == 1 and slow[0]["wall_ms"] > 3000, slow
        assert all(s["wall_ms"] < 1500 for s in slow[1:]), slow
        assert "warning: iteration 1 took" in stdout
        expected = "stall timeout 600 s" if timeout is None else "off"
        assert expected in json.loads(report.read_text())["watchdog"]


def test_a_fault_that_cannot_fire_is_refused(tmp_path):
    for fault, message in (("7:1", "SPMD_MOE_FAULT: rank 7 does not exist (world size 2)"),
                           ("1:5", "SPMD_MOE_FAULT: layer 5 does not exist (n_layers=5)"),
                           ("1:1:nap", "KIND is one of"), ("x", "expected RANK:LAYER")):
        job = Job("run", "--preset", "tiny", ranks=2, fault=fault, cwd=tmp_path)
        status, _, _, stderr = job.finish(limit=60)
        assert status == 2, stderr
        check_one_line(stderr, message)


# --- units -----------------------------------------------------------------------------

def test_ranks_text():
    assert ranks_text([3]) == "rank 3"
    assert ranks_text([0, 1, 2, 5]) == "ranks 0-2, 5"
    assert ranks_text([4, 1]) == "ranks 1, 4"


def test_a_watchdog_without_a_world_only_keeps_marks():
    dog = Watchdog(None, 0)
    assert dog.comm is None and "off" in dog.status
    dog.at_layer(3)
    with dog.waiting("dispatch"):
        phase, layer, waiting, _ = dog.where()
        assert (phase, layer, waiting) == ("dispatch", 3, True)
    assert dog.where()[:3] == ("start", 3, False)
    with pytest.raises(ValueError):
        Watchdog(None, float("nan"))


def test_slow_iterations_are_those_far_above_the_median_of_the_others():
    assert slow_iterations([100.0, 7000.0, 110.0, 95.0]) == [
        {"iteration": 2, "wall_ms": 7000.0, "median_others_ms": 100.0, "times_median": 70.0}]
    assert slow_iterations([70000.0, 500.0])[0]["iteration"] == 1   # two iterations suffice
    assert slow_iterations([100.0, 150.0, 120.0]) == []
    assert slow_iterations([100.0]) == []


def test_a_line_on_stderr_is_one_write(monkeypatch):
    # CI once saw "iteration 2/200: 1297.1 msspmd-moe: error: interrupted ...": print wrote
    # the progress text, the interrupt arrived before its newline, and the error line was
    # glued on. say() hands stderr the whole line at once.
    from spmd_moe.core.errors import say

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)
            return len(text)

        def flush(self):
            raise KeyboardInterrupt        # the interrupt lands after the write

    stream = Recorder()
    monkeypatch.setattr(sys, "stderr", stream)
    with pytest.raises(KeyboardInterrupt):
        say("spmd-moe: iteration 2/200: 1297.1 ms")
    assert stream.writes == ["spmd-moe: iteration 2/200: 1297.1 ms\n"]
