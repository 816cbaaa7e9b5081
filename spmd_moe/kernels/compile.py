"""Kernel sources and their compilation with NVRTC.

The ``.cu`` files beside this module are the kernels; ``bf16.cuh`` is pasted in place of
its ``#include`` line before compiling, so the text handed to the compiler (and hashed by
CuPy's on-disk kernel cache) is the whole program and needs no include path.

- :func:`load_module`: a ``cupy.RawModule`` for the current device, compiled once per
  process and source (CuPy picks ``-arch`` for the device and caches the cubin on disk).
- :func:`compile_source` / :func:`compile_all`: sources to cubin (and PTX) for a named
  architecture through ``cupy.cuda.nvrtc`` directly. They touch no device, so the tests
  run them without a GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("flash_attention.cu", "expert_ffn.cu", "permute.cu")
# C++17 for the lambdas and constexpr in the sources; CuPy 14 defaults to it, NVRTC 12 not.
OPTIONS = ("-std=c++17",)

_INCLUDE = re.compile(r'^#include "([^"]+)"[^\n]*$', re.MULTILINE)
_modules: dict[tuple[int, str], object] = {}


def source(name: str) -> str:
    """The text of kernel source ``name`` with its local includes pasted in."""
    text = (KERNEL_DIR / name).read_text()
    return _INCLUDE.sub(lambda m: (KERNEL_DIR / m.group(1)).read_text(), text)


def entry_points(ptx: str) -> list[str]:
    """The kernel names defined in a PTX text (``extern "C"``, so unmangled)."""
    return re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.MULTILINE)


@dataclass(frozen=True)
class Compiled:
    """One source compiled for one architecture: machine code, the PTX it came from, and
    the compiler's log (ptxas register and spill counts when asked with -Xptxas -v)."""

    cubin: bytes
    ptx: str
    log: str


def compile_source(name: str, arch: str = "sm_90a",
                   extra_options: tuple[str, ...] = ()) -> Compiled:
    """Compile source ``name`` for ``arch`` (``sm_XX`` or ``sm_XXa``) with NVRTC, without a
    device. Raises RuntimeError with the compiler log when compilation fails."""
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


def compile_all(arch: str = "sm_90a") -> dict[str, bytes]:
    """Every kernel source compiled to cubin for ``arch``: ``{source name: cubin}``."""
    return {name: compile_source(name, arch).cubin for name in SOURCES}


def load_module(name: str):
    """The ``cupy.RawModule`` of source ``name`` on the current device, compiled on first
    use in this process (and kept on disk by CuPy's cache across processes)."""
    import cupy

    key = (cupy.cuda.Device().id, name)
    if key not in _modules:
        module = cupy.RawModule(code=source(name), options=OPTIONS, backend="nvrtc")
        # Compile now (RawModule is lazy): a failure belongs to attach(), not to layer 3.
        module.compile()
        _modules[key] = module
    return _modules[key]
