"""How token rows move between ranks: count exchange, Alltoallv dispatch/combine,
allreduce (TP baseline) and stage-to-stage point-to-point (pipeline).

Transports (SPEC §3), chosen by :func:`choose_transport`:

- ``mpi-host``: MPI on host memory. On the NumPy backend arrays already live there; on CuPy
  rows are staged through pinned host buffers with asynchronous copies.
- ``mpi-cuda``: device buffers handed straight to a CUDA-aware MPI, after the host has
  waited for the work they depend on. Only when the loaded MPI library *says* it is
  CUDA-aware: handing a device pointer to one that is not crashes the process (Debian's
  Open MPI 4.1 segfaults).
- ``nccl``: CuPy's NCCL communicators, built from a unique id broadcast over MPI; grouped
  send/recv per peer.

Every exchange is started and returns a request (``Test()``, ``Wait()``): blocking is
``start(...).Wait()``, one spelling (overlap.py runs them). Rows travel as rows: a
contiguous MPI datatype of ``d`` words, so counts and displacements are row counts (byte
counts overflow a C int at paper size), and bf16 goes as 16-bit words.

Notation: P peers in the communicator, R rows, d words per row.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from ..backend.array import Backend
from ..backend.host import loaded_libraries
from ..core.errors import ConfigError

TRANSPORTS = ("auto", "mpi-cuda", "mpi-host", "nccl")
CUDA_AWARE_ENV = "SPMD_MOE_CUDA_AWARE"


# --- what the MPI library can do -------------------------------------------------------

@dataclass
class MpiLibrary:
    """The loaded MPI library and whether it accepts device buffers (and how we know)."""

    version: str
    path: str | None
    cuda_aware: bool
    cuda_reason: str


def loaded_libmpi_path() -> str | None:
    """Path of the libmpi this process has loaded (not its C++/Fortran bindings)."""
    for path in loaded_libraries():
        name = os.path.basename(path)
        if name.startswith(("libmpi.so", "libmpi_", "libmpich")) and not name.startswith(
                ("libmpi_cxx", "libmpi_mpifh", "libmpi_usempi")):
            return path
    return None


def query_cuda_support(lib: ctypes.CDLL | None) -> tuple[bool, str]:
    """Ask the library itself: Open MPI's ``MPIX_Query_cuda_support()``, MPICH's
    ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &flag)``. No answer means no."""
    if lib is None:
        return False, "libmpi not found among the loaded libraries"
    query = getattr(lib, "MPIX_Query_cuda_support", None)
    if query is not None:
        query.restype = ctypes.c_int
        supported = bool(query())
        return supported, f"MPIX_Query_cuda_support() = {int(supported)}"
    gpu_query = getattr(lib, "MPIX_GPU_query_support", None)
    if gpu_query is not None:
        flag = ctypes.c_int(0)
        gpu_query.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        gpu_query(0, ctypes.byref(flag))  # MPIX_GPU_SUPPORT_CUDA == 0
        return bool(flag.value), f"MPIX_GPU_query_support(CUDA) = {flag.value}"
    return False, "library has no CUDA-support query (MPIX_Query_cuda_support)"


def mpi_library() -> MpiLibrary:
    """Describe the MPI library mpi4py loaded. ``SPMD_MOE_CUDA_AWARE=1|0`` overrides the
    library's own answer (for MPIs that support device buffers but cannot say so)."""
    from mpi4py import MPI

    version = MPI.Get_library_version().strip().splitlines()[0].strip()
    path = loaded_libmpi_path()
    forced = os.environ.get(CUDA_AWARE_ENV)
    if forced in ("0", "1"):
        return MpiLibrary(version, path, forced == "1", f"forced by {CUDA_AWARE_ENV}={forced}")
    try:
        lib = ctypes.CDLL(path) if path else None
    except OSError:
        lib = None
    aware, reason = query_cuda_support(lib)
    return MpiLibrary(version, path, aware, reason)


def nccl_available() -> bool:
    """Whether CuPy's NCCL binding has a real libnccl behind it (CuPy imports a stub when
    the library is missing, so importing is not enough)."""
    try:
        from cupy.cuda import nccl
    except Exception:
        return False
    return bool(getattr(nccl, "available", False))


# --- choosing --------------------------------------------------------------------------

@dataclass
class TransportChoice:
    name: str
    reason: str


def choose_transport(requested: str, backend_name: str, library: MpiLibrary,
                     nccl_available: bool = False) -> TransportChoice:
    """Pick the dispatch/combine transport, or refuse with the reason. Pure: tested on CPU."""
    if requested not in TRANSPORTS:
        raise ConfigError("transport", f"{requested!r} is not one of {', '.join(TRANSPORTS)}")
    if backend_name == "numpy":
        if requested in ("auto", "mpi-host"):
            return TransportChoice("mpi-host", "NumPy backend: arrays are in host memory")
        raise ConfigError("transport", f"{requested} needs the cupy backend; the NumPy "
                                       "backend uses mpi-host")
    if requested == "mpi-cuda":
        if not library.cuda_aware:
            raise ConfigError("transport", f"mpi-cuda refused: the MPI library is not "
                                           f"CUDA-aware ({library.cuda_reason}); use "
                                           "mpi-host or nccl")
        return TransportChoice("mpi-cuda", f"requested; {library.cuda_reason}")
    if requested == "nccl":
        if not nccl_available:
            raise ConfigError("transport", "nccl requested but cupy.cuda.nccl is not available")
        return TransportChoice("nccl", "requested")
    if requested == "mpi-host":
        return TransportChoice("mpi-host", "requested")
    if library.cuda_aware:
        return TransportChoice("mpi-cuda", f"auto: {library.cuda_reason}")
    return TransportChoice("mpi-host", f"auto: MPI is not CUDA-aware ({library.cuda_reason}); "
                                       "staging through pinned host buffers")


# --- moving rows -----------------------------------------------------------------------

_WORD = {1: "UINT8_T", 2: "UINT16_T", 4: "UINT32_T", 8: "UINT64_T"}


def allreduce_bytes(nbytes: int, peers: int) -> int:
    """Bytes one rank sends in a ring allreduce of ``nbytes``: 2 (P-1)/P of the buffer."""
    return 2 * (peers - 1) * nbytes // peers if peers > 1 else 0


def displacements(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=out[1:])
    return out


class PendingExchange:
    """A started non-blocking exchange: a dispatch or combine (``ialltoallv``) or a TP
    allreduce (``iallreduce_sum``).

    ``Test()`` says whether it has completed (and, being an MPI call, lets MPI progress it:
    without an asynchronous progress thread MPICH moves data only inside MPI calls);
    ``Wait()`` blocks until it has and returns its result (the received rows, or the reduced
    array). ``requests``: MPI requests; ``hold``: buffers MPI reads or writes, kept alive
    until then; ``finish(result)``: what completes it on the caller's side once MPI is done
    (a copy back to the device), run once, in ``Wait``. ``Wait`` is the only blocking call,
    so a stall watchdog wraps it as it wraps any MPI wait.
    """

    def __init__(self, requests: list, result, hold: tuple = (), finish=None):
        self.requests, self.result = requests, result
        self.hold, self.finish = hold, finish
        self.done = not requests

    def Test(self) -> bool:
        if not self.done:
            from mpi4py import MPI

            self.done = bool(MPI.Request.Testall(self.requests))
        return self.done

    def Wait(self):
        if not self.done:
            from mpi4py import MPI

            MPI.Request.Waitall(self.requests)
            self.done = True
        result = self.result
        if self.finish is not None:
            result, self.finish = self.finish(result), None
        # Hand the result over: a finished exchange kept for its accounting holds no rows.
        self.result, self.hold = None, ()
        return result


class PendingSend:
    """A started send and the buffer it reads, which must outlive it."""

    def __init__(self, request, buffer):
        self.request, self.buffer = request, buffer

    def Wait(self) -> None:
        self.request.Wait()
        self.buffer = None


class HostMpiTransport:
    """MPI on host arrays (the NumPy backend). Subclasses for the GPU move device arrays;
    the count exchange is always on the host (counts drive host decisions)."""

    name = "mpi-host"

    def __init__(self, backend: Backend, reason: str = ""):
        self.backend = backend
        self.reason = reason
        self._row_types: dict[tuple[int, int], object] = {}

    def row_type(self, itemsize: int, width: int):
        """Contiguous datatype of one row: counts are in rows, not bytes."""
        key = (itemsize, width)
        if key not in self._row_types:
            from mpi4py import MPI

            word = getattr(MPI, _WORD[itemsize])
            self._row_types[key] = word.Create_contiguous(width).Commit()
        return self._row_types[key]

    @staticmethod
    def words(arr: np.ndarray) -> np.ndarray:
        """The same memory as unsigned words (bf16 goes as 16-bit words)."""
        return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))

    def ialltoall_counts(self, comm, send_host: np.ndarray) -> PendingExchange:
        """send_host: int64 [P, n] (row p goes to peer p). Starts ``MPI_Ialltoall`` (host
        memory on every transport); ``Wait()`` returns the int64 [P, n] from each peer."""
        send = np.ascontiguousarray(send_host, dtype=np.int64)
        recv = np.empty_like(send)
        return PendingExchange([comm.Ialltoall(send, recv)], recv, hold=(send,))

    def ialltoallv(self, comm, send, send_counts: np.ndarray,
                   recv_counts: np.ndarray) -> PendingExchange:
        """send: [R, d] rows grouped by destination peer, ``send_counts[p]`` rows each.
        Starts ``MPI_Ialltoallv``; ``Wait()`` returns the received rows
        [sum(recv_counts), d], grouped by source peer. Every rank of ``comm`` starts its
        exchanges on it in the same order (MPI matches non-blocking collectives in order)."""
        width = send.shape[1]
        send = np.ascontiguousarray(send)
        recv = np.empty((int(recv_counts.sum()), width), dtype=send.dtype)
        rows = self.row_type(send.dtype.itemsize, width)
        request = comm.Ialltoallv(
            [self.words(send), (send_counts, displacements(send_counts)), rows],
            [self.words(recv), (recv_counts, displacements(recv_counts)), rows])
        return PendingExchange([request], recv, hold=(send,))

    def iallreduce_sum(self, comm, arr) -> PendingExchange:
        """Start the in-place sum over ranks of a float32 array (``MPI_Iallreduce``);
        ``Wait()`` returns ``arr``, summed. Overlap on and off both use it, so their sums
        are the same bits."""
        from mpi4py import MPI

        return PendingExchange([comm.Iallreduce(MPI.IN_PLACE, arr, op=MPI.SUM)], arr)

    def isend(self, comm, arr, dest: int, tag: int):
        """Start sending rows [n, d]; returns a request whose ``Wait()`` ends it."""
        arr = np.ascontiguousarray(arr)
        return PendingSend(comm.Isend(self.words(arr), dest=dest, tag=tag), arr)

    def irecv(self, comm, shape: tuple[int, ...], dtype: np.dtype, source: int,
              tag: int) -> PendingExchange:
        """Start receiving an array of ``shape``; ``Wait()`` returns it. Receives from one
        source and tag match in the order they are started."""
        arr = np.empty(shape, dtype=dtype)
        return PendingExchange([comm.Irecv(self.words(arr), source=source, tag=tag)], arr)

    def free(self) -> None:
        for row_type in self._row_types.values():
            row_type.Free()
        self._row_types.clear()

