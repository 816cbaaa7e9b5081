"""Fused CUDA kernels for the CuPy backend (flash attention, expert FFN, permutation).

Kernel sources are the ``.cu`` files beside this module (compile.py), compiled with NVRTC
into an on-disk cache shared by processes and loaded once per process; the launch code is
fused.py, its pure-NumPy planning (tile lists, tile heights, variants, chunk sizes)
schedule.py. ``attach(backend)`` gives a CuPy backend
its fused kernels when they load, and says why not when they do not: the reason is shown by
``spmd-moe info`` and in the report (never a silent fallback to the generic code).

``SPMD_MOE_KERNELS=0`` turns them off (the generic CuPy array code runs instead).
``precompile(arch)`` compiles every source for an architecture into the cache without a
GPU (bin/gpu-check runs it first, so later stages and ranks load instead of compiling).
"""
from __future__ import annotations

import os

from ..array import register_kernels
from .compile import SOURCES, compile_source, entry_points, precompile

__all__ = ["SOURCES", "attach", "compile_source", "entry_points", "kernel_status",
           "load_kernels", "precompile"]

ENV = "SPMD_MOE_KERNELS"
_OFF = ("0", "off", "false", "no")
# Per device id: (FusedKernels or None, reason). One compile (or failure) per process.
_loaded: dict[int, tuple[object, str]] = {}


def disabled_reason() -> str | None:
    """Why the kernels are off by request, or None."""
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in _OFF:
        return f"disabled by {ENV}={value}: the CuPy backend runs the generic array code"
    return None


def load_kernels() -> tuple[object, str]:
    """``(FusedKernels, description)`` for the current CUDA device, or ``(None, reason)``."""
    off = disabled_reason()
    if off is not None:
        return None, off
    try:
        import cupy

        device_id = cupy.cuda.Device().id
    except Exception as exc:   # no CuPy, no driver, no device: a reason, not a crash
        return None, f"unavailable: {type(exc).__name__}: {_first_line(exc)}"
    if device_id not in _loaded:
        try:
            from .fused import FusedKernels

            kernels = FusedKernels.for_current_device()
            _loaded[device_id] = (kernels, kernels.describe())
        except Exception as exc:   # compile or load failure: reported by info and the report
            _loaded[device_id] = (None, f"failed to load ({type(exc).__name__}: "
                                        f"{_first_line(exc)}); the CuPy backend runs the "
                                        f"generic array code")
    return _loaded[device_id]


def attach(backend) -> None:
    """Set ``backend.kernels`` (a FusedKernels, or None) and ``backend.kernels_reason``
    (one line saying which and why)."""
    if not backend.on_gpu:
        backend.kernels, backend.kernels_reason = None, "NumPy backend: generic array code"
        return
    backend.kernels, backend.kernels_reason = load_kernels()


def fit_model(backend, head_dim: int, v_dim: int | None = None) -> None:
    """Leave attention to the generic array code (with the reason, in ``kernels_reason``)
    when the model's head dim (and value width ``v_dim``, default the head dim) is one the
    attention kernel has no variant for, before the first layer rather than in it; the
    expert FFN and permutation kernels stay on. Idempotent (the engine, ``info --model``
    and the bench may each call it)."""
    if backend.kernels is None or not backend.kernels.fused_attention:
        return
    from .schedule import attention_variant

    try:
        attention_variant(head_dim, backend.dtype_name, v_dim=v_dim)
    except ValueError as exc:
        backend.kernels = backend.kernels.without_attention(str(exc))
        backend.kernels_reason = backend.kernels.describe()


register_kernels(attach)


def kernel_status() -> str:
    """One line for ``spmd-moe info``: the fused kernels on this process's device."""
    return load_kernels()[1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
