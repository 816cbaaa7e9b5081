"""Fused CUDA kernels for the CuPy backend (flash attention, expert FFN, permutation).

Kernel sources are the ``.cu`` files beside this module, compiled once per process with
NVRTC and cached. ``attach(backend)`` gives a CuPy backend its fused kernels when they load.
"""
from __future__ import annotations


def kernel_status() -> str:
    return "none: the CuPy backend runs the generic array code"


def attach(backend) -> None:
    """Leave ``backend.kernels`` as None: no fused kernels yet."""
    backend.kernels = None
    backend.kernels_reason = kernel_status()
