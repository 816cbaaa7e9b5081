"""Progress of the steps that take minutes at paper shapes, on rank 0's stderr.

Generating or loading a rank's weights on the host, and long loops of iterations or decode
steps, say how far they are. Modes (:func:`choose_mode`):

- ``bar``: stderr is a terminal: one line redrawn in place (``\\r``), at most 10 times a
  second, ended with a newline when the step is done;
- ``lines``: stderr is a pipe or file (a batch job's log): whole lines, rate-limited, at
  most one every :data:`LINE_INTERVAL` seconds unless another tenth of the step is done;
- ``every``: ``run --progress``: a line for each iteration or step, quick or not (what
  ``--progress`` printed before, kept for scripts that read it);
- ``off``: ``--quiet``, and every rank but 0.

``bar`` and ``lines`` stay silent for the first :data:`DELAY` seconds of a step
(``SPMD_MOE_PROGRESS_DELAY`` overrides it), so a quick run prints nothing it did not print
before. Every write is a single write of whole text (errors.say's rule: an interrupt cannot
split a line).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

DELAY = 2.0               # seconds before a step's first progress output
LINE_INTERVAL = 5.0       # plain lines: at most one per this many seconds...
LINE_FRACTION = 0.1       # ...unless this much more of the step is done
BAR_INTERVAL = 0.1        # a bar is redrawn at most this often
BAR_WIDTH = 24
MODES = ("bar", "lines", "every", "off")
DELAY_ENV = "SPMD_MOE_PROGRESS_DELAY"


def choose_mode(quiet: bool = False, every: bool = False, stream=None, rank: int = 0) -> str:
    """``off`` (--quiet, or not rank 0), ``every`` (--progress), else ``bar`` on a terminal
    and ``lines`` otherwise."""
    if quiet or rank != 0:
        return "off"
    if every:
        return "every"
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "bar" if tty else "lines"


def _delay() -> float:
    try:
        return max(0.0, float(os.environ.get(DELAY_ENV, DELAY)))
    except ValueError:
        return DELAY


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """One step's progress: ``update(done)`` as it goes (``done`` of ``total`` units),
    ``close()`` at its end. Cheap when nothing is shown (a comparison and a clock read)."""

    def __init__(self, label: str, total: int, mode: str = "off", stream=None,
                 clock: Callable[[], float] = time.monotonic, delay: float | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {MODES}")
        self.label, self.total, self.mode = label, max(0, int(total)), mode
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.delay = _delay() if delay is None else delay
        self.started = clock()
        self.last_shown = None          # (time, done) of the last output
        self.bar_open = False
        self.done = 0

    def _write(self, text: str) -> None:
        self.stream.write(text)         # one write: errors.say's rule
        self.stream.flush()

    def _status(self, done: int, now: float, note: str) -> str:
        elapsed = now - self.started
        text = f"{done}/{self.total}" if self.total else f"{done}"
        if self.total and done:
            text += f" ({100 * done / self.total:.0f}%), {_clock_text(elapsed)}"
            if done < self.total:
                text += f", ~{_clock_text(elapsed * (self.total - done) / done)} left"
        else:
            text += f", {_clock_text(elapsed)}"
        return text + (f"; {note}" if note else "")

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if self.mode == "off":
            return
        if self.mode == "every":
            self._write(f"spmd-moe: {self.label} {done}/{self.total}"
                        + (f": {note}" if note else "") + "\n")
            return
        now = self.clock()
        if now - self.started < self.delay:
            return
        if self.mode == "lines":
            if self.last_shown is not None:
                since, shown = self.last_shown
                more = (done - shown) / self.total if self.total else 0.0
                if now - since < LINE_INTERVAL and more < LINE_FRACTION and \
                        done < self.total:
                    return
            self._write(f"spmd-moe: {self.label} {self._status(done, now, note)}\n")
        else:
            if self.last_shown is not None and now - self.last_shown[0] < BAR_INTERVAL \
                    and done < self.total:
                return
            filled = BAR_WIDTH * done // self.total if self.total else 0
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self._write(f"\rspmd-moe: {self.label} [{bar}] {self._status(done, now, note)}"
                        "\x1b[K")
            self.bar_open = True
        self.last_shown = (now, done)

    def close(self) -> None:
        """The step is over: a bar gets its newline; a step that showed lines gets its last
        one when it has not been shown."""
        if self.mode == "lines" and self.last_shown is not None and \
                self.last_shown[1] != self.done:
            self._write(f"spmd-moe: {self.label} "
                        f"{self._status(self.done, self.clock(), '')}\n")
        if self.bar_open:
            self._write("\n")
            self.bar_open = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Reporter:
    """Makes a :class:`Progress` per step in one mode (``off`` makes silent ones)."""

    def __init__(self, mode: str = "off", stream=None):
        self.mode, self.stream = mode, stream

    def __call__(self, label: str, total: int, each: bool = False) -> Progress:
        """A step of ``total`` units; ``each``: its units are iterations or decode steps,
        which ``every`` shows one by one (other steps show as ``lines`` there)."""
        mode = "lines" if self.mode == "every" and not each else self.mode
        return Progress(label, total, mode, self.stream)


SILENT = Reporter("off")
