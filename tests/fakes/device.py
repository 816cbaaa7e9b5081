"""An asynchronous fake CUDA device on host memory: what a GPU would do, run on the CPU.

- **Memory** (:class:`Pool`): allocations rounded to 512 bytes, served best-fit (the last
  freed among equals) from the free chunks of the stream they were made on. An array freed
  on the host hands its chunk back at once, as CuPy's pool does, although work queued on a
  stream may still read or write it: the next allocation of that size gets it. Fresh memory
  is poisoned (bytes 0xFF: NaN for floats, -1 for integers). Pinned host memory has a pool
  of its own.
- **Streams** (:class:`FakeStream`): every kernel, copy, GEMM, generic array operation and
  NCCL call is queued on a stream and runs only when something waits for it: a stream or
  event synchronize, a copy to pageable host memory, a read of a device scalar, an event
  query (which first runs a few queued operations, at random, so that polling ends). While
  one stream is waited for, the others advance too, in a seeded random order; an event
  wait orders two non-blocking streams (the legacy default stream and blocking streams
  also order with each other, as CUDA's implicit synchronisation does). At every call a
  little queued work may run "in the background" (``eager``), so that the interleavings
  vary with the seed.
- **Hazards** (:class:`DeviceHazard`, raised where they happen): a buffer handed to MPI at a
  host call (:func:`checked_comm`) while queued work still writes it (a send) or touches
  it (a receive); an operation that runs while an operation issued earlier on another
  stream, touching the same memory with one of them writing, is still queued (a missing
  event). Kernels count as reading and writing every array they take.
- **Deadlock** (:class:`DeviceDeadlock`): nothing can run for ``deadlock_s`` seconds while
  a stream waits in an NCCL call for its peers.
- While the host blocks in an MPI call with NCCL work queued, a helper thread runs the
  device (a GPU does not wait for its host), so that the fake does not deadlock where the
  hardware would not.

One device per process at a time (:func:`current`); the arrays are :class:`DeviceArray`
(a NumPy array in pool memory) and the array module is cupy.py's :class:`FakeCupy`.
Listeners (``device.listeners``) hear each operation queued (``launched(kind, name)``) and
each time the host waits for the device (``waited(kind)``: ``stream``, ``device``,
``event``, ``read``): the launch count (tests/launch_count.py) is one.
"""
from __future__ import annotations

import bisect
import collections
import ctypes
import itertools
import os
import threading
import time
import weakref

import numpy as np

ALIGN = 512
SEGMENT_BYTES = 4 << 20
POISON = 0xFF
DEADLOCK_S = float(os.environ.get("SPMD_MOE_FAKE_DEADLOCK_S", "60"))


class DeviceHazard(AssertionError):
    """Memory used by two parties without the ordering a GPU needs."""


class DeviceDeadlock(RuntimeError):
    """Streams blocked in NCCL calls that no peer will ever match."""


_current: "FakeDevice | None" = None


def current() -> "FakeDevice":
    assert _current is not None, "no fake device is active (use `with FakeDevice(...)`)"
    return _current


def byte_range(arr: np.ndarray) -> tuple[int, int]:
    """[low, high) addresses an array's elements occupy."""
    address = arr.__array_interface__["data"][0]
    if arr.size == 0:
        return address, address
    spans = [(n - 1) * stride for n, stride in zip(arr.shape, arr.strides)]
    return (address + sum(min(0, s) for s in spans),
            address + sum(max(0, s) for s in spans) + arr.dtype.itemsize)


def host_view(address: int, nbytes: int) -> np.ndarray:
    """uint8 view of ``nbytes`` at ``address`` (memory this process owns)."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))


# --- memory ------------------------------------------------------------------------------

class Chunk:
    __slots__ = ("segment", "offset", "size", "stream")

    def __init__(self, segment: np.ndarray, offset: int, size: int, stream: int):
        self.segment, self.offset, self.size, self.stream = segment, offset, size, stream

    @property
    def address(self) -> int:
        return self.segment.ctypes.data + self.offset


class Pool:
    """Segments of host memory that are never given back (queued work may point into them),
    cut into chunks; free chunks per stream, best fit, split when larger."""

    def __init__(self, name: str):
        self.name = name
        self.segments: list[np.ndarray] = []
        self.starts: list[int] = []          # sorted segment addresses (for lookup)
        self.free: dict[int, list[Chunk]] = collections.defaultdict(list)
        self.in_use = 0

    def _segment(self, nbytes: int) -> np.ndarray:
        size = max(nbytes, SEGMENT_BYTES)
        backing = np.empty(size + ALIGN, dtype=np.uint8)         # cudaMalloc: 512-aligned
        start = -backing.ctypes.data % ALIGN
        segment = backing[start:start + size]
        segment[...] = POISON
        at = bisect.bisect(self.starts, segment.ctypes.data)
        self.starts.insert(at, segment.ctypes.data)
        self.segments.insert(at, segment)
        return segment

    def allocate(self, nbytes: int, stream: int) -> Chunk:
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        free = self.free[stream]
        fits = [(c.size, -i) for i, c in enumerate(free) if c.size >= size]
        if fits:
            # Best fit; among equals the last freed, as CuPy's free lists pop it.
            chunk = free.pop(-min(fits)[1])
            if chunk.size > size:
                free.append(Chunk(chunk.segment, chunk.offset + size, chunk.size - size,
                                  stream))
                chunk = Chunk(chunk.segment, chunk.offset, size, stream)
        else:
            segment = self._segment(size)
            chunk = Chunk(segment, 0, size, stream)
            if segment.nbytes > size:
                free.append(Chunk(segment, size, segment.nbytes - size, stream))
        self.in_use += chunk.size
        return chunk

    def release(self, chunk: Chunk) -> None:
        self.in_use -= chunk.size
        self.free[chunk.stream].append(chunk)

    def find(self, address: int) -> np.ndarray | None:
        """The segment holding ``address``, or None (memory not from this pool)."""
        at = bisect.bisect(self.starts, address) - 1
        if at >= 0 and address < self.starts[at] + self.segments[at].nbytes:
            return self.segments[at]
        return None

    def free_all_blocks(self) -> None:
        """CuPy's free_all_blocks: nothing to give back here (segments are kept)."""


# --- operations and streams ----------------------------------------------------------------

class Op:
    """One queued operation. ``kind``: work (a function), record (an event), wait (for an
    event's record), nccl (MPI requests posted when it starts, done when they complete)."""

    __slots__ = ("seq", "stream", "kind", "name", "run", "reads", "writes", "event", "target",
                 "start", "requests", "done", "__weakref__")

    def __init__(self, seq, stream, kind, name, run=None, reads=(), writes=(), event=None,
                 target=None, start=None):
        self.seq, self.stream, self.kind, self.name = seq, stream, kind, name
        self.run, self.reads, self.writes = run, list(reads), list(writes)
        self.event, self.target, self.start = event, target, start
        self.requests = None
        self.done = False

    def touches(self, low: int, high: int, writes_only: bool) -> str | None:
        """'writes' or 'reads' if this op touches [low, high) (only writes if asked)."""
        for a, b in self.writes:
            if a < high and low < b:
                return "writes"
        if not writes_only:
            for a, b in self.reads:
                if a < high and low < b:
                    return "reads"
        return None

    def describe(self) -> str:
        return f"{self.name} (op {self.seq} on stream {self.stream.ptr})"


class FakeStream:
    """A stream: its queue of operations (CuPy's ``cupy.cuda.Stream``)."""

    def __init__(self, device: "FakeDevice", ptr: int, non_blocking: bool = True):
        self.device, self.ptr, self.non_blocking = device, ptr, non_blocking
        self.queue: collections.deque[Op] = collections.deque()
        self._previous: list = []

    def synchronize(self) -> None:
        self.device.synchronize_stream(self)

    def wait_event(self, event: "FakeEvent") -> None:
        self.device.wait_event(self, event)

    def record(self, event: "FakeEvent | None" = None) -> "FakeEvent":
        event = event or FakeEvent()
        event.record(self)
        return event

    @property
    def done(self) -> bool:
        return self.device.query(lambda: not self.queue)

    def use(self) -> "FakeStream":
        self.device.current_stream = self
        return self

    def __enter__(self):
        self._previous.append(self.device.current_stream)
        self.device.current_stream = self
        return self

    def __exit__(self, *exc):
        self.device.current_stream = self._previous.pop()

    def __repr__(self) -> str:
        return f"FakeStream(ptr={self.ptr}, queued={len(self.queue)})"


class FakeEvent:
    """An event (CuPy's ``cupy.cuda.Event``): ``record`` queues a record op on a stream;
    ``done``, ``synchronize`` and ``stream.wait_event`` refer to the latest record."""

    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False):
        self.device = current()
        self.record_op: Op | None = None
        self.time: float | None = None       # device clock (microseconds) when it ran
        self.stream: FakeStream | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        self.stream = stream or self.device.current_stream
        self.record_op = self.device.enqueue_record(self.stream, self)

    @property
    def done(self) -> bool:
        op = self.record_op
        return op is None or self.device.query(lambda: op.done)

    def synchronize(self) -> None:
        op = self.record_op
        if op is not None:
            self.device.wait_for(lambda: op.done, "event", bias=op.stream)


def get_elapsed_time(start: FakeEvent, stop: FakeEvent) -> float:
    """Milliseconds between two events that have run (the fake clock: 1 us per op)."""
    if start.time is None or stop.time is None:
        raise RuntimeError("cudaErrorNotReady: an event has not completed")
    return (stop.time - start.time) / 1e3


# --- the device ----------------------------------------------------------------------------

class FakeDevice:
    """Pools, streams, the queue, the seeded scheduler (module docstring). Use as a context
    manager: it becomes :func:`current` inside."""

    def __init__(self, seed: int = 0, eager: float = 0.2, deadlock_s: float = DEADLOCK_S,
                 name: str = "fake GPU"):
        self.seed, self.name = seed, name
        self.rng = np.random.default_rng(seed)
        self.eager, self.deadlock_s = eager, deadlock_s
        self.memory = Pool("device")
        self.pinned = Pool("pinned")
        self.streams: list[FakeStream] = []
        self._ptrs = itertools.count(1)
        self.null_stream = self.new_stream(ptr=0)
        self.current_stream = self.null_stream
        self.seq = itertools.count()
        self.clock = 0.0
        self.listeners: list = []
        self.executed = 0
        self.lock = threading.RLock()
        self.last_call = time.monotonic()
        self._stop = threading.Event()
        self._helper: threading.Thread | None = None
        self._previous: list = []
        self.hazards_checked = 0
        self.failure: BaseException | None = None     # raised in the helper thread
        self.last_progress = time.monotonic()
        self.backends: list = []         # backends made on it (tests read their kernels)

    # --- activation ---------------------------------------------------------------------

    def __enter__(self) -> "FakeDevice":
        global _current
        self._previous.append(_current)
        _current = self
        self._stop.clear()
        self._helper = threading.Thread(target=self._run_while_host_blocks, daemon=True,
                                        name="fake-device")
        self._helper.start()
        return self

    def __exit__(self, *exc) -> None:
        global _current
        self._stop.set()
        if self._helper is not None:
            self._helper.join()
        _current = self._previous.pop()

    def new_stream(self, ptr: int | None = None, non_blocking: bool = True) -> FakeStream:
        stream = FakeStream(self, next(self._ptrs) if ptr is None else ptr, non_blocking)
        self.streams.append(stream)
        return stream

    def stream_of(self, ptr: int) -> FakeStream:
        for stream in self.streams:
            if stream.ptr == ptr:
                return stream
        raise AssertionError(f"no stream with ptr {ptr}")

    # --- memory -------------------------------------------------------------------------

    def allocate(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` in device memory (its owner: when it and every view
        of it are gone, the chunk goes back to the pool)."""
        with self.lock:
            chunk = self.memory.allocate(nbytes, self.current_stream.ptr)
        owner = chunk.segment[chunk.offset:chunk.offset + nbytes]
        weakref.finalize(owner, self._release, self.memory, chunk)
        return owner

    def allocate_pinned(self, nbytes: int) -> np.ndarray:
        with self.lock:
            chunk = self.pinned.allocate(nbytes, 0)
        owner = chunk.segment[chunk.offset:chunk.offset + nbytes]
        weakref.finalize(owner, self._release, self.pinned, chunk)
        return owner

    def _release(self, pool: Pool, chunk: Chunk) -> None:
        with self.lock:
            pool.release(chunk)

    def segment_of(self, address: int) -> np.ndarray | None:
        segment = self.memory.find(address)
        return segment if segment is not None else self.pinned.find(address)

    def is_device_memory(self, address: int) -> bool:
        return self.memory.find(address) is not None

    def raw(self, arr):
        """A plain view of ``arr``'s memory that does not keep its owner alive (queued work
        must not: a GPU kernel does not hold its arguments). Host arrays pass through."""
        if not isinstance(arr, np.ndarray):
            return arr
        address = arr.__array_interface__["data"][0]
        segment = self.segment_of(address)
        if segment is None:
            return np.asarray(arr)
        offset = address - segment.ctypes.data
        return np.ndarray(arr.shape, arr.dtype, buffer=segment, offset=offset,
                          strides=arr.strides)

    def ranges(self, arrays) -> list[tuple[int, int]]:
        """Byte ranges of the device or pinned arrays among ``arrays``."""
        out = []
        for arr in arrays:
            if isinstance(arr, np.ndarray):
                low, high = byte_range(arr)
                if high > low and self.segment_of(low) is not None:
                    out.append((low, high))
        return out

    # --- queueing -----------------------------------------------------------------------

    def _raise_failure(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _tell(self, method: str, *args) -> None:
        for listener in self.listeners:
            getattr(listener, method)(*args)

    def enqueue(self, name: str, run, reads=(), writes=(), stream: FakeStream | None = None,
                kind: str = "work", count: bool = True, start=None) -> Op:
        """Queue ``run()`` on ``stream`` (default: the current one). ``reads``/``writes``:
        arrays (or byte ranges) it touches. ``count``: a device call a listener hears."""
        with self.lock:
            self._raise_failure()
            stream = stream or self.current_stream
            op = Op(next(self.seq), stream, kind, name, run, self._as_ranges(reads),
                    self._as_ranges(writes), start=start)
            self._append(stream, op)
            if count:
                self._tell("launched", kind, name)
            self._background()
            self.last_call = time.monotonic()
            return op

    def _append(self, stream: FakeStream, op: Op) -> None:
        """Queue ``op`` on ``stream``. The legacy default stream (ptr 0) and the blocking
        streams order with each other, as CUDA's implicit synchronisation has it: work on
        one waits for what the others have queued; non-blocking streams order only by
        events."""
        if stream is self.null_stream:
            after = [s.queue[-1] for s in self.streams
                     if s is not stream and not s.non_blocking and s.queue]
        elif not stream.non_blocking and self.null_stream.queue:
            after = [self.null_stream.queue[-1]]
        else:
            after = []
        for target in after:
            stream.queue.append(Op(next(self.seq), stream, "wait", "legacy stream order",
                                   target=target))
        stream.queue.append(op)

    def _as_ranges(self, items) -> list[tuple[int, int]]:
        out = []
        for item in items:
            if isinstance(item, tuple):
                out.append(item)
            else:
                out.extend(self.ranges([item]))
        return out

    def enqueue_record(self, stream: FakeStream, event: FakeEvent) -> Op:
        with self.lock:
            op = Op(next(self.seq), stream, "record", "event record", event=event)
            self._append(stream, op)
            self.last_call = time.monotonic()
            return op

    def wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        """``stream`` waits (on the device) for ``event``'s latest record; none: no wait."""
        if event.record_op is None:
            return
        with self.lock:
            self._append(stream, Op(next(self.seq), stream, "wait", "event wait",
                                    target=event.record_op))
            self.last_call = time.monotonic()

    # --- running ------------------------------------------------------------------------

    def _head_ready(self, stream: FakeStream) -> bool:
        op = stream.queue[0]
        if op.kind == "wait":
            return op.target.done
        if op.kind == "nccl" and op.requests is not None:
            from mpi4py import MPI

            return bool(MPI.Request.Testall(op.requests))
        return True

    def _runnable(self) -> list[FakeStream]:
        return [s for s in self.streams if s.queue and self._head_ready(s)]

    def _step(self, stream: FakeStream) -> None:
        """Run (or, for an NCCL call not yet started, start) ``stream``'s next operation."""
        op = stream.queue[0]
        self.last_progress = time.monotonic()
        if op.kind == "nccl" and op.requests is None:
            self._check_races(op)
            op.requests = op.start()
            return
        stream.queue.popleft()
        if op.kind == "work":
            self._check_races(op)
            with np.errstate(all="ignore"):
                op.run()
            self.clock += 1.0
        elif op.kind == "record":
            op.event.time = self.clock
        else:
            self.clock += 1.0
        op.done = True
        op.run = None
        self.executed += 1

    def _check_races(self, op: Op) -> None:
        """An earlier-issued op on another stream still queued, touching what ``op``
        touches, one of them writing: nothing ordered them (a missing event)."""
        if not op.reads and not op.writes:
            return
        for other_stream in self.streams:
            if other_stream is op.stream:
                continue
            for other in other_stream.queue:
                if other.seq > op.seq:
                    break
                if other.kind not in ("work", "nccl") or other is op:
                    continue
                for low, high in op.writes:
                    hit = other.touches(low, high, writes_only=False)
                    if hit:
                        raise DeviceHazard(f"{op.describe()} writes memory that "
                                           f"{other.describe()}, issued earlier on another "
                                           f"stream and not yet run, {hit}: no event orders "
                                           "them")
                for low, high in op.reads:
                    if other.touches(low, high, writes_only=True):
                        raise DeviceHazard(f"{op.describe()} reads memory that "
                                           f"{other.describe()}, issued earlier on another "
                                           "stream and not yet run, writes: no event "
                                           "orders them")

    def _pick(self, runnable: list[FakeStream], bias: FakeStream | None) -> FakeStream:
        if bias is not None and bias in runnable and self.rng.random() < 0.5:
            return bias
        return runnable[int(self.rng.integers(len(runnable)))]

    def _background(self) -> None:
        """A little queued work at random: the device runs while the host queues."""
        if self.eager and self.rng.random() < self.eager:
            for _ in range(int(self.rng.integers(1, 4))):
                runnable = self._runnable()
                if not runnable:
                    return
                self._step(self._pick(runnable, None))

    def wait_for(self, satisfied, kind: str, bias: FakeStream | None = None) -> None:
        """Run queued work (streams in a seeded random order) until ``satisfied()``; the
        host waits meanwhile (a listener hears ``kind``)."""
        with self.lock:
            self._raise_failure()
            self._tell("waited", kind)
            while not satisfied():
                runnable = self._runnable()
                if runnable:
                    self._step(self._pick(runnable, bias))
                    continue
                blocked = [s for s in self.streams if s.queue]
                if not any(s.queue[0].kind == "nccl" for s in blocked):
                    raise AssertionError(f"fake device: waiting for work that cannot run "
                                         f"({[s.queue[0].describe() for s in blocked]})")
                self._check_deadlock()
                time.sleep(0.0005)
            self.last_call = time.monotonic()

    def _check_deadlock(self) -> None:
        """Nothing runnable, streams blocked in NCCL calls: after ``deadlock_s`` seconds
        without progress (the peers never came), a DeviceDeadlock."""
        if time.monotonic() - self.last_progress <= self.deadlock_s:
            return
        blocked = [s for s in self.streams if s.queue]
        raise DeviceDeadlock(
            "device deadlock: " + "; ".join(
                f"stream {s.ptr} waits in {s.queue[0].describe()} with {len(s.queue) - 1} "
                "op(s) behind it" for s in blocked)
            + f" (nothing ran for {self.deadlock_s:.0f} s)")

    def query(self, satisfied) -> bool:
        """An event or stream query: first a few queued operations (at random), so that a
        host polling in a loop sees the device advance (and a deadlock is reported)."""
        with self.lock:
            self._raise_failure()
            if not satisfied():
                for _ in range(int(self.rng.integers(0, 4))):
                    runnable = self._runnable()
                    if not runnable:
                        break
                    self._step(self._pick(runnable, None))
                if not satisfied() and not self._runnable() and any(
                        s.queue and s.queue[0].kind == "nccl" for s in self.streams):
                    self._check_deadlock()
            self.last_call = time.monotonic()
            return bool(satisfied())

    def synchronize_stream(self, stream: FakeStream) -> None:
        self.wait_for(lambda: not stream.queue, "stream", bias=stream)

    def synchronize(self) -> None:
        """The whole device (``cudaDeviceSynchronize``)."""
        self.wait_for(lambda: not any(s.queue for s in self.streams), "device")

    def pending(self) -> int:
        return sum(len(s.queue) for s in self.streams)

    # --- the host's side ------------------------------------------------------------------

    def check_host_access(self, arr, write: bool, what: str) -> None:
        """``arr`` (device or pinned memory) is read (``write`` False) or written by the host
        now, outside every stream (MPI): no queued op may write it, nor, when the host
        writes, read it."""
        if not isinstance(arr, np.ndarray):
            return
        low, high = byte_range(arr)
        if high <= low or self.segment_of(low) is None:
            return
        with self.lock:
            self.hazards_checked += 1
            for stream in self.streams:
                for op in stream.queue:
                    if op.kind not in ("work", "nccl"):
                        continue
                    hit = op.touches(low, high, writes_only=not write)
                    if hit:
                        raise DeviceHazard(
                            f"{what} {'writes' if write else 'reads'} {high - low} bytes at "
                            f"the host call while {op.describe()}, queued and not yet run, "
                            f"{hit} them: the stream was not synchronised first")

    def _run_while_host_blocks(self) -> None:
        """The helper thread: with NCCL work queued and the host silent for a few
        milliseconds (blocked in MPI), run what can run."""
        while not self._stop.wait(0.002):
            if time.monotonic() - self.last_call < 0.01:
                continue
            if not self.lock.acquire(blocking=False):
                continue
            try:
                if any(op.kind == "nccl" for s in self.streams for op in s.queue):
                    for _ in range(64):
                        runnable = self._runnable()
                        if not runnable:
                            break
                        self._step(self._pick(runnable, None))
            except BaseException as exc:   # the host's next call raises it, where it belongs
                self.failure = exc
            finally:
                self.lock.release()
