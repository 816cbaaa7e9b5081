"""Probes of the host a rank runs on: its memory, its resident set, the shared libraries
it has loaded, and the BLAS threads it may use. Nothing here touches a device or MPI."""
from __future__ import annotations

import ctypes
import os


def host_memory(node_size: int) -> tuple[int, str]:
    """Bytes of host memory one of the node's ``node_size`` ranks may use."""
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62, "host memory unknown"
    return free // node_size, f"host MemAvailable / {node_size} rank(s) on this node"


def resident_bytes() -> int:
    """This process's resident set size now (bytes; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_resident_bytes() -> int:
    """The largest resident set size this process has had (bytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


BLAS_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


_BLAS_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                 "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                 "MKL_Set_Num_Threads")


def share_blas_threads(ranks_on_node: int) -> str:
    """Give each rank ``cores / ranks on the node`` BLAS threads (at least one), unless the
    user set a thread variable. Every rank's BLAS spawning a thread per core oversubscribes
    the node: on 2 cores, 4 ranks ran the ``small`` preset 9x slower (docs/PERFORMANCE.md).
    Returns a line for the report saying what was done."""
    for name in BLAS_THREAD_ENV:
        if os.environ.get(name):
            return f"BLAS threads left to {name}={os.environ[name]}"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, ranks_on_node))
    blas = [p for p in loaded_libraries()
            if any(f in os.path.basename(p) for f in ("openblas", "mkl_rt", "libblas"))]
    for path in blas:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _BLAS_SETTERS:
            setter = getattr(lib, symbol, None)
            if setter is not None:
                setter(ctypes.c_int(threads))
                return (f"BLAS threads {threads} per rank ({cores} cores, {ranks_on_node} "
                        f"rank(s) on this node)")
    return "BLAS threads not set (no known BLAS library loaded)"


def loaded_libraries() -> list[str]:
    """Paths of the shared libraries this process has mapped, in load order (from
    /proc/self/maps; empty where there is none)."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                path = fields[-1] if len(fields) >= 6 else ""
                if ".so" in os.path.basename(path) and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found
