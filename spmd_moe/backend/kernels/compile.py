"""Kernel sources and their compilation with NVRTC: one compile function for run time and
tests alike.

The ``.cu`` files beside this module are the kernels; ``bf16.cuh`` is pasted in place of
its ``#include`` line before compiling, so the text handed to the compiler is the whole
program and needs no include path (nothing here depends on a CUDA toolkit's headers).

- :func:`compile_source`: a source to cubin (and PTX) for a named architecture through
  ``cupy.cuda.nvrtc``, with :data:`OPTIONS`. It touches no device, so the tests run it
  without a GPU.
- :func:`cubin_path`: the same compile, kept on disk in :func:`cache_dir` under a key of
  the source text, the options, the architecture and the NVRTC version; a later process
  (another rank, the next stage of bin/gpu-check) loads the file instead of compiling.
- :func:`load_module`: a ``cupy.RawModule`` of that cubin for the current device, once per
  process and device. So the code that runs is the code the tests compiled and inspected:
  CuPy's own ``RawModule(code=...)`` path would add options of its own (``-ftz=true``) and
  pick its own ``-arch``.
- :func:`precompile`: every source for an architecture into the cache, timed (the first
  stage of bin/gpu-check after its preflight, so that later stages never wait on NVRTC).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("flash_attention.cu", "expert_ffn.cu", "permute.cu", "rowwise.cu", "mla.cu")
# The options of every compile, at run time and in the tests. C++17 for the lambdas and
# constexpr in the sources (NVRTC 12 defaults to C++14). -ftz=true: float32 denormals flush
# to zero, which lets exp2f/log2f compile to the fast ex2/lg2 instructions; it is also what
# CuPy adds to every kernel it compiles itself (cupy/cuda/compiler.py), so the kernels'
# float32 arithmetic matches CuPy's elementwise kernels beside them.
OPTIONS = ("-std=c++17", "-ftz=true")
CACHE_ENV = "SPMD_MOE_KERNEL_CACHE"

_INCLUDE = re.compile(r'^#include "([^"]+)"[^\n]*$', re.MULTILINE)
_modules: dict[tuple[int, str], object] = {}


def source(name: str) -> str:
    """The text of kernel source ``name`` with its local includes pasted in."""
    text = (KERNEL_DIR / name).read_text()
    return _INCLUDE.sub(lambda m: (KERNEL_DIR / m.group(1)).read_text(), text)


def entry_points(ptx: str) -> list[str]:
    """The kernel names defined in a PTX text (``extern "C"``, so unmangled)."""
    return re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.MULTILINE)


def device_arch(compute_capability: str | int) -> str:
    """The NVRTC target for a device of compute capability ``"90"`` (CuPy's spelling):
    ``sm_90a`` on Hopper, whose arch-specific target the tests compile and inspect (a
    cubin for sm_90a runs on compute capability 9.0 only, which is what it is built for
    here); ``sm_XY`` elsewhere."""
    cc = str(compute_capability)
    return "sm_90a" if cc == "90" else f"sm_{cc}"


@dataclass(frozen=True)
class Compiled:
    """One source compiled for one architecture: machine code, the PTX it came from, and
    the compiler's log (ptxas register and spill counts when asked with -Xptxas -v)."""

    cubin: bytes
    ptx: str
    log: str


def compile_source(name: str, arch: str = "sm_90a",
                   extra_options: tuple[str, ...] = ()) -> Compiled:
    """Compile source ``name`` for ``arch`` (``sm_XX`` or ``sm_XXa``) with NVRTC and
    :data:`OPTIONS`, without a device. Raises RuntimeError with the compiler log when
    compilation fails."""
    from cupy.cuda import nvrtc

    program = nvrtc.createProgram(source(name), name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, [f"--gpu-architecture={arch}", *OPTIONS,
                                           *extra_options])
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed on {name} for {arch}: {exc}\n"
                               f"{nvrtc.getProgramLog(program)}") from None
        return Compiled(bytes(nvrtc.getCUBIN(program)), bytes(nvrtc.getPTX(program)).decode(),
                        nvrtc.getProgramLog(program))
    finally:
        nvrtc.destroyProgram(program)


# --- the on-disk cache ----------------------------------------------------------------

def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$SPMD_MOE_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/spmd_moe/backend/kernels`` (``~/.cache/...``). Shared by every process of
    the user, so ranks and later runs load instead of compiling."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spmd_moe" / "kernels"


def _nvrtc_version() -> str:
    from cupy.cuda import nvrtc

    return ".".join(str(v) for v in nvrtc.getVersion())


def cache_key(name: str, arch: str) -> str:
    """What decides the machine code: the source text (includes pasted in), the options,
    the target and the compiler's version."""
    text = "\0".join((source(name), " ".join(OPTIONS), arch, _nvrtc_version()))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cubin_path(name: str, arch: str) -> tuple[Path, bool]:
    """``(path of the cached cubin of source name for arch, whether it was compiled now)``.
    A miss compiles with :func:`compile_source` and writes the cubin and its entry points
    atomically (rename), so ranks compiling at once on one node cannot read half a file."""
    directory = cache_dir()
    stem = f"{Path(name).stem}-{arch}-{cache_key(name, arch)}"
    path = directory / f"{stem}.cubin"
    if path.is_file() and (directory / f"{stem}.json").is_file():
        return path, False
    compiled = compile_source(name, arch)
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, data in ((".json", json.dumps(entry_points(compiled.ptx)).encode()),
                         (".cubin", compiled.cubin)):
        partial = directory / f"{stem}{suffix}.{os.getpid()}.partial"
        partial.write_bytes(data)
        os.replace(partial, directory / f"{stem}{suffix}")
    return path, True


def cached_entry_points(path: Path) -> list[str]:
    """The kernel names of a cached cubin (written beside it by :func:`cubin_path`)."""
    return json.loads(path.with_suffix(".json").read_text())


def precompile(arch: str, names: tuple[str, ...] = SOURCES) -> list[tuple[str, float, bool]]:
    """Compile (or find) every source for ``arch`` in the cache:
    ``[(source name, seconds, compiled now)]``."""
    done = []
    for name in names:
        began = time.perf_counter()
        _, compiled = cubin_path(name, arch)
        done.append((name, time.perf_counter() - began, compiled))
    return done


def load_module(name: str):
    """The ``cupy.RawModule`` of source ``name`` on the current device: the cached cubin
    for the device's architecture (compiled on a miss). Every kernel of the source is
    fetched once here, so a load failure belongs to attach(), not to layer 3."""
    import cupy

    device = cupy.cuda.Device()
    key = (device.id, name)
    if key not in _modules:
        path, _ = cubin_path(name, device_arch(device.compute_capability))
        module = cupy.RawModule(path=str(path))
        for kernel in cached_entry_points(path):
            module.get_function(kernel)
        _modules[key] = module
    return _modules[key]
