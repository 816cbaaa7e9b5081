"""The job's guard against interrupts and stalls: one thread on every rank.

A rank blocked inside a C-level MPI call (or a CUDA stream synchronisation) runs no Python
signal handler until the call returns, which may be never: the other ranks of a collective
it waits in have died or stopped. So nothing here runs on the main thread. Each rank starts
a :class:`Watchdog` thread that

- **ends the job on a signal.** SIGINT (Ctrl-C: mpiexec forwards it to every rank), SIGTERM
  and SIGHUP wake the thread through ``signal.set_wakeup_fd`` even while the main thread is
  blocked in MPI; it prints one line (rank 0 at once; another rank after a short pause, so
  that a signal sent to every rank is reported once) and calls ``MPI_Abort`` with
  128 + the signal number.
- **names the ranks a stalled collective waits for** (``--stall-timeout SECONDS``, 0 = off).
  The main thread marks where it is (:meth:`Watchdog.phase`, :meth:`Watchdog.waiting`:
  phase, layer, iteration, and whether it is waiting for other ranks or computing). When
  this rank has waited longer than the timeout, its thread asks every other rank's thread
  where it is, on a duplicated communicator; the ranks that do not answer within a grace
  period (stopped, or hung with their threads) and those that answer but are not waiting
  (stuck computing) did not arrive. The lowest rank that saw the stall prints one line
  naming them, the phase and the layer, and aborts the job with :data:`EXIT_STALL`. A wait
  that ends while the question is out is no stall: nothing happens.

The main thread's marks are plain attribute writes (a tuple, replaced atomically): the
normal path pays no MPI call and no lock for them. The thread's MPI calls need
``MPI_THREAD_MULTIPLE``; when the library provides less, stalls are not watched and a
signal ends this process (which makes the launcher end the job), as :attr:`Watchdog.status`
says.

:func:`abort` is the one way out for a failing rank: its message is flushed and drained
from the stderr pipe before ``MPI_Abort``, which may otherwise kill the launcher's reader
before the message is forwarded.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import select
import signal
import socket
import struct
import termios
import threading
import time
from typing import Iterator

from ..core.errors import say
from ..core.files import discard_staged

EXIT_STALL = 3                        # exit status of a job the watchdog aborted
DEFAULT_STALL_TIMEOUT = 600.0         # seconds; torch.distributed's default timeout too
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
HANDLED = frozenset(int(signum) for signum in SIGNALS)
_STOP = b"\0"                         # not a signal number: tells the thread to end
_QUERY, _ANSWER = 7101, 7102          # tags on the watchdog's own communicator
_STATUS = struct.Struct("<iiiid44s")  # rank, waiting, layer, iteration, seconds, phase
_OTHER_RANK_PAUSE = 1.0               # a non-zero rank reports a signal after this


def _pending_output(fd: int) -> int:
    """Bytes written to ``fd`` (a pipe) that its reader has not taken yet (0 if unknown)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def abort(world, code: int, message: str) -> None:
    """Remove this rank's unfinished output temporaries (files.discard_staged), print
    ``message`` on stderr, wait (at most a second) until the launcher has read it, then end
    the whole job with ``code``. Never returns."""
    discard_staged()
    say(message)
    deadline = time.monotonic() + 1.0
    while _pending_output(2) > 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    if world is not None and world.Get_size() > 1:
        from mpi4py import MPI

        if MPI.Query_thread() == MPI.THREAD_MULTIPLE or \
                threading.current_thread() is threading.main_thread():
            world.Abort(code)
    os._exit(code)


def _at(phase: str, layer: int) -> str:
    return f"{phase} at layer {layer}" if layer >= 0 else phase


def ranks_text(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"ranks 0-2, 5"``; ``[3]`` -> ``"rank 3"``."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    parts = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run))
             for run in runs]
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(parts)


class Watchdog:
    """One rank's guard (see the module docstring). Build it on every rank (collective when
    stalls are watched on more than one rank); :meth:`close` it on every rank.

    ``Watchdog(None, 0)`` watches nothing and installs nothing: its marks cost an attribute
    write, so library callers (tests) need not care.
    """

    def __init__(self, world, stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                 handle_signals: bool = True):
        if not (isinstance(stall_timeout, (int, float)) and 0 <= stall_timeout < math.inf):
            raise ValueError(f"stall_timeout {stall_timeout!r} must be finite and >= 0")
        self.world = world
        self.rank = world.Get_rank() if world is not None else 0
        self.size = world.Get_size() if world is not None else 1
        self.timeout = float(stall_timeout)
        # (phase, layer, waiting, since, sequence number of the wait): replaced, never mutated
        self._position: tuple[str, int, bool, float, int] = ("start", -1, False,
                                                             time.monotonic(), 0)
        self._waits = 0
        self.iteration = 0
        self.raised_at: tuple[str, int] | None = None   # where an exception left a phase
        self.comm = None
        self._thread: threading.Thread | None = None
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup = -1
        multiple = True
        if world is not None:
            from mpi4py import MPI

            multiple = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        watch = self.timeout > 0 and self.size > 1 and multiple
        if watch:
            self.comm = world.Dup()
        if self.timeout == 0:
            stalls = "stall watchdog off (--stall-timeout 0)"
        elif self.size == 1:
            stalls = f"stall timeout {self.timeout:g} s (one rank: nothing to wait for)"
        elif not multiple:
            stalls = ("stalls not watched: the MPI library does not provide "
                      "MPI_THREAD_MULTIPLE")
        else:
            stalls = f"stall timeout {self.timeout:g} s"
        self.status = stalls
        if handle_signals and world is not None:
            self._start(watch)

    # --- the main thread's marks ---------------------------------------------------------

    def at_layer(self, layer: int) -> None:
        phase, _, waiting, since, seq = self._position
        self._position = (phase, layer, waiting, since, seq)

    def enter(self, name: str, waiting: bool = False) -> tuple:
        """Mark the main thread as in ``name`` (waiting for other ranks, or computing);
        returns what :meth:`leave` restores."""
        before = self._position
        self._waits += 1
        self._position = (name, before[1], waiting, time.monotonic(), self._waits)
        return before

    def leave(self, before: tuple, failed: bool = False) -> None:
        if failed and self.raised_at is None:
            self.raised_at = self._position[:2]          # where an exception left from
        self._position = (before[0], self._position[1], before[2], time.monotonic(),
                          before[4])

    @contextlib.contextmanager
    def phase(self, name: str, waiting: bool = False) -> Iterator[None]:
        """:meth:`enter` and :meth:`leave` around a block."""
        before = self.enter(name, waiting)
        try:
            yield
        except BaseException:
            self.leave(before, failed=True)
            raise
        self.leave(before)

    def waiting(self, name: str):
        """Mark a wait for other ranks (a collective, a receive) outside the layer loop."""
        return self.phase(name, waiting=True)

    def where(self) -> tuple[str, int, bool, float]:
        """(phase, layer, waiting, seconds in it) of the main thread now."""
        phase, layer, waiting, since, _ = self._position
        return phase, layer, waiting, time.monotonic() - since

    # --- the thread ----------------------------------------------------------------------

    def _start(self, watch: bool) -> None:
        self._wake_read, self._wake_write = socket.socketpair()
        for end in (self._wake_read, self._wake_write):
            end.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_write.fileno(),
                                                warn_on_full_buffer=False)
        for signum in SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_main_thread)
        self._thread = threading.Thread(target=self._run, args=(watch,), daemon=True,
                                        name="spmd-moe watchdog")
        self._thread.start()

    def _on_main_thread(self, signum, frame) -> None:
        """Python's handler (runs on the main thread when it can): the thread does the
        work; only if the thread is gone does the signal interrupt the main thread."""
        if self._thread is None or not self._thread.is_alive():
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def _run(self, watch: bool) -> None:
        try:
            stall = _StallWatch(self) if watch else None
            tick = min(1.0, max(0.05, self.timeout / 10)) if watch else None
            while True:
                ready, _, _ = select.select([self._wake_read], [], [], tick)
                if ready:
                    data = self._wake_read.recv(64)
                    for signum in data:
                        if signum == _STOP[0]:
                            if stall is not None:
                                stall.close()
                            return
                        if signum in HANDLED:      # not a signal someone else handles
                            self._interrupted(signum)
                if stall is not None:
                    stall.step()
        except BaseException as exc:       # never silently: the job is unguarded from now
            say(f"spmd-moe: rank {self.rank}: watchdog stopped: {exc!r}")

    def _interrupted(self, signum: int) -> None:
        if self.rank != 0:
            # Sent to every rank (mpiexec forwards Ctrl-C): rank 0 reports and aborts first.
            time.sleep(_OTHER_RANK_PAUSE)
        name = signal.Signals(signum).name
        phase, layer, _, _ = self.where()
        abort(self.world, 128 + signum, f"spmd-moe: error: interrupted: rank {self.rank} got "
                                        f"{name} (in {_at(phase, layer)}); ending the job")

    def close(self) -> None:
        """Stop watching (every rank, collective when stalls are watched): a last watched
        barrier, so that no rank stops answering while another may still ask."""
        if self.comm is not None:
            with self.waiting("finish"):
                self.world.Barrier()
        if self._thread is not None:
            self._wake_write.send(_STOP)
            self._thread.join()
            self._thread = None
            signal.set_wakeup_fd(self._old_wakeup)
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            self._wake_read.close()
            self._wake_write.close()
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


class _StallWatch:
    """The thread's half of stall detection: answer other ranks' questions, and ask them
    when this rank has waited too long."""

    def __init__(self, dog: Watchdog):
        from mpi4py import MPI

        self.MPI = MPI
        self.dog, self.comm = dog, dog.comm
        self.grace = max(1.0, min(5.0, dog.timeout / 2))
        self.query = bytearray(_STATUS.size + 4)
        self.query_request = self.comm.Irecv(self.query, source=MPI.ANY_SOURCE, tag=_QUERY)
        self.sends: list = []
        self.asked_seq = -1            # the wait last asked about
        self.inquiry: dict | None = None
        self.inquiries = 0
        self.quiet_until = 0.0         # until then a lower rank that asked reports the stall

    def _status(self) -> bytes:
        phase, layer, waiting, seconds = self.dog.where()
        return _STATUS.pack(self.dog.rank, int(waiting), layer, self.dog.iteration, seconds,
                            phase.encode()[:44])

    def step(self) -> None:
        self.sends = [r for r in self.sends if not r.Test()]
        self._answer()
        now = time.monotonic()
        if self.inquiry is not None:
            self._collect(now)
            return
        phase, layer, waiting, since, seq = self.dog._position
        if waiting and now - since > self.dog.timeout and seq != self.asked_seq and \
                now >= self.quiet_until:
            self._ask(seq, now)

    def _answer(self) -> None:
        status = self.MPI.Status()
        while self.query_request.Test(status):
            source = status.Get_source()
            tag = struct.unpack_from("<i", self.query, _STATUS.size)[0]
            if source < self.dog.rank:
                self.quiet_until = time.monotonic() + 3 * self.grace
            self.sends.append(self.comm.Isend(self._status(), dest=source, tag=tag))
            self.query_request = self.comm.Irecv(self.query, source=self.MPI.ANY_SOURCE,
                                                 tag=_QUERY)

    def _ask(self, seq: int, now: float) -> None:
        self.asked_seq = seq
        self.inquiries += 1
        tag = _ANSWER + 2 * self.inquiries          # answers to an old question never match
        question = self._status() + struct.pack("<i", tag)
        buffers, requests = {}, {}
        for peer in range(self.dog.size):
            if peer == self.dog.rank:
                continue
            self.sends.append(self.comm.Isend(question, dest=peer, tag=_QUERY))
            buffers[peer] = bytearray(_STATUS.size)
            requests[peer] = self.comm.Irecv(buffers[peer], source=peer, tag=tag)
        self.inquiry = {"seq": seq, "start": now, "buffers": buffers, "requests": requests,
                        "answers": {}}

    def _collect(self, now: float) -> None:
        inquiry = self.inquiry
        for peer, request in list(inquiry["requests"].items()):
            if request.Test():
                inquiry["answers"][peer] = _STATUS.unpack(inquiry["buffers"][peer])
                del inquiry["requests"][peer]
        if inquiry["requests"] and now - inquiry["start"] < self.grace:
            return
        self.inquiry = None
        if self.dog._position[4] != inquiry["seq"]:
            self._forget(inquiry)
            return                                     # the wait ended: no stall
        if now < self.quiet_until:
            self._forget(inquiry)
            self.asked_seq = -1                        # a lower rank reports; ask again later
            return
        abort(self.dog.world, EXIT_STALL, self.describe(inquiry))

    @staticmethod
    def _forget(inquiry: dict) -> None:
        for request in inquiry["requests"].values():   # ranks that never answered
            request.Cancel()
            request.Wait()

    def describe(self, inquiry: dict) -> str:
        """The one line: who did not arrive, where this rank waits, where the others are."""
        dog = self.dog
        phase, layer, _, seconds = dog.where()
        silent = sorted(inquiry["requests"])
        answers = {peer: (bool(waiting), name.rstrip(b"\0").decode(errors="replace"),
                          peer_layer, peer_seconds)
                   for peer, (_, waiting, peer_layer, _, peer_seconds, name)
                   in inquiry["answers"].items()}
        busy = sorted(peer for peer, a in answers.items() if not a[0])
        late = sorted(silent + busy)
        here = (f"rank {dog.rank} waited {seconds:.1f} s in {_at(phase, layer)} (iteration "
                f"{dog.iteration})")
        if late:
            parts = [f"{ranks_text(late)} did not arrive within --stall-timeout "
                     f"{dog.timeout:g} s: {here}"]
        else:
            parts = [f"every rank is waiting (a deadlock): {here}"]
        if silent:
            parts.append(f"{ranks_text(silent)} did not answer (stopped or hung)")
        for peer in busy:
            _, name, peer_layer, peer_seconds = answers[peer]
            parts.append(f"rank {peer} is busy in {_at(name, peer_layer)} for "
                         f"{peer_seconds:.1f} s")
        places: dict[str, list[int]] = {}
        for peer, (waiting, name, peer_layer, _) in answers.items():
            if waiting:
                places.setdefault(_at(name, peer_layer), []).append(peer)
        if places:
            parts.append("waiting: " + ", ".join(f"{ranks_text(peers)} in {where}" for where,
                                                 peers in sorted(places.items(),
                                                                 key=lambda kv: min(kv[1]))))
        return "spmd-moe: error: stall: " + "; ".join(parts) + "; aborting the job"

    def close(self) -> None:
        if self.inquiry is not None:
            self._forget(self.inquiry)
        self.query_request.Cancel()
        self.query_request.Wait()
        for request in self.sends:
            request.Wait()
