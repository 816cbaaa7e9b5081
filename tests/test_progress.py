"""Progress on rank 0 (spmd_moe/core/progress.py): a bar on a terminal, rate-limited lines
otherwise, a line per iteration with --progress, nothing with --quiet."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest
from test_cli import spmd_moe

from spmd_moe.core.progress import LINE_INTERVAL, Progress, Reporter, choose_mode


class Stream:
    """A stderr stand-in recording each write (a write is one piece of text)."""

    def __init__(self, tty: bool = False):
        self.writes: list[str] = []
        self.tty = tty

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_mode_follows_the_flags_the_terminal_and_the_rank():
    assert choose_mode(stream=Stream(tty=True)) == "bar"
    assert choose_mode(stream=Stream(tty=False)) == "lines"
    assert choose_mode(quiet=True, stream=Stream(tty=True)) == "off"
    assert choose_mode(every=True, stream=Stream()) == "every"
    assert choose_mode(stream=Stream(tty=True), rank=1) == "off"


def test_lines_wait_then_come_every_few_seconds_or_tenth():
    stream, clock = Stream(), Clock()
    progress = Progress("generating weights", 100, "lines", stream, clock, delay=2.0)
    progress.update(1)
    assert stream.writes == []                       # quick steps print nothing
    clock.now = 2.5
    progress.update(2)
    assert stream.writes == ["spmd-moe: generating weights 2/100 (2%), 2 s, ~2 min 02 s "
                             "left\n"]
    clock.now = 3.0
    progress.update(5)                               # neither 5 s nor 10% later
    assert len(stream.writes) == 1
    progress.update(12)                              # another tenth
    clock.now = 3.0 + LINE_INTERVAL
    progress.update(13)                              # five seconds
    assert len(stream.writes) == 3
    progress.update(14)
    progress.close()                                 # the end is said once
    assert stream.writes[-1].startswith("spmd-moe: generating weights 14/100")
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in stream.writes)


def test_a_bar_redraws_one_line_and_ends_it():
    stream, clock = Stream(tty=True), Clock()
    with Progress("iteration", 4, "bar", stream, clock, delay=0.0) as progress:
        for i in range(1, 5):
            clock.now += 1.0
            progress.update(i, f"{i} ms")
    assert all(w.startswith("\rspmd-moe: iteration [") for w in stream.writes[:-1])
    assert "[######------------------] 1/4 (25%)" in stream.writes[0]
    assert "[########################] 4/4 (100%), 4 s; 4 ms" in stream.writes[-2]
    assert stream.writes[-1] == "\n"


def test_every_and_off():
    stream = Stream()
    reporter = Reporter("every", stream)
    with reporter("iteration", 2, each=True) as progress:
        progress.update(1, "12.5 ms")
        progress.update(2, "11.0 ms")
    assert stream.writes == ["spmd-moe: iteration 1/2: 12.5 ms\n",
                             "spmd-moe: iteration 2/2: 11.0 ms\n"]
    assert reporter("generating weights", 10).mode == "lines"   # not a line per expert
    quiet = Stream()
    with Reporter("off", quiet)("iteration", 3, each=True) as progress:
        progress.update(3)
    assert quiet.writes == []


# --- the command line -------------------------------------------------------------------

RUN = ["run", "--preset", "tiny", "--iters", "3", "--warmup", "1"]
NOW = {"SPMD_MOE_PROGRESS_DELAY": "0"}        # show progress from the start of each step


def run_on_a_terminal(args: list[str], timeout: float = 120.0) -> tuple[int, str]:
    """The CLI with stderr on a pseudo-terminal (stdout a pipe); its status and stderr."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "spmd_moe", *args],
                            stdout=subprocess.DEVNULL, stderr=follower,
                            env={**os.environ, **NOW}, start_new_session=True)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        if not ready:
            proc.kill()
            pytest.fail("no output from the terminal run")
        try:
            data = os.read(leader, 4096)
        except OSError:                  # the follower side closed: the process ended
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout), b"".join(chunks).decode()


def test_a_terminal_gets_a_bar():
    status, err = run_on_a_terminal(RUN)
    assert status == 0, err
    assert "\rspmd-moe: generating weights [" in err
    assert "\rspmd-moe: iteration [########################] 3/3 (100%)" in err
    assert "spmd-moe: iteration 1/3:" not in err      # not the --progress lines


def test_a_pipe_gets_plain_lines_and_quiet_gets_none():
    plain = spmd_moe(*RUN, ranks=2, env=NOW)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stderr.splitlines()
    assert "\r" not in plain.stderr and "\x1b" not in plain.stderr
    assert any(line.startswith("spmd-moe: generating weights") for line in lines)
    assert any(line.startswith("spmd-moe: iteration 3/3 (100%)") for line in lines)
    assert sum("iteration 3/3" in line for line in lines) == 1     # rank 0 only, once
    quiet = spmd_moe(*RUN, "--quiet", ranks=2, env=NOW)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    every = spmd_moe(*RUN, "--progress", ranks=2)
    assert [line for line in every.stderr.splitlines() if "iteration" in line] == [
        line for line in every.stderr.splitlines() if line.startswith("spmd-moe: iteration ")]
    assert "spmd-moe: iteration 2/3: " in every.stderr


def test_progress_and_quiet_together_are_refused():
    result = spmd_moe(*RUN, "--progress", "--quiet")
    assert result.returncode == 2
    assert result.stderr.startswith("spmd-moe: error: --progress: ")
