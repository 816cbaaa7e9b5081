"""The engine's GPU path on the fake device: :class:`FakeGpuBackend` (the CuPy backend: its
GPU branches, the fake CuPy, the fused kernels' launch code on the fake kernels) and
:func:`fake_gpu_sessions`, under which engine.runner opens sessions on it with a device
transport (``mpi-cuda``, ``mpi-host`` or ``nccl``, the real transport code on CupyOps over
the fake CuPy; MPI buffers checked at the host call, fakes/mpi.py; NCCL on fakes/nccl.py).
"""
from __future__ import annotations

import contextlib

from spmd_moe.backend.array import Backend, BackendChoice
from spmd_moe.backend.host import host_memory
from spmd_moe.parallel.mpi_device import CudaAwareMpiTransport, PinnedHostMpiTransport
from spmd_moe.parallel.nccl import NcclTransport
from spmd_moe.parallel.transport import MpiLibrary, TransportChoice

from .cupy import FakeCupy
from .device import current
from .kernels import make_fake_fused
from .mpi import checked_comm
from .nccl import FakeNccl

AWARE = MpiLibrary("fake MPI", None, True, "fake device: device buffers accepted")
CHOICE = BackendChoice("cupy", "fake device", device_id=0, device_name="fake GPU",
                       device_count=1)
DEVICE_TRANSPORTS = ("mpi-cuda", "mpi-host", "nccl")


class FakeGpuBackend(Backend):
    """The CuPy backend on the current fake device: ``on_gpu``, the fake CuPy as ``xp``,
    bf16 GEMMs by the backend's cublasGemmEx on the fake cuBLAS, and (``kernels``) the
    fused kernels' launch code."""

    def __init__(self, choice: BackendChoice, dtype: str, kernels: bool = True):
        super().__init__(BackendChoice("numpy", "fake device", node_size=choice.node_size),
                         dtype)
        self.choice, self.name = choice, "cupy"
        self.xp = FakeCupy(current())
        self.matmul_path = "cublasGemmEx (bf16 in, float32 accumulate) on the fake device"
        self.kernels = make_fake_fused() if kernels else None
        self.kernels_reason = (self.kernels.describe() if kernels else
                               "fake device without the fused kernels: generic array code")
        current().backends.append(self)


def make_fake_transport(choice: TransportChoice, backend: Backend):
    """The device transport ``choice`` names, on the fake device (CupyOps over the fake
    CuPy: the transports' own stream and copy code)."""
    if choice.name == "mpi-cuda":
        return CudaAwareMpiTransport(backend, choice.reason, AWARE)
    if choice.name == "mpi-host":
        return PinnedHostMpiTransport(backend, choice.reason)
    assert choice.name == "nccl", choice.name
    nccl = FakeNccl()
    return NcclTransport(backend, choice.reason, nccl=nccl,
                         communicator_factory=nccl.communicator)


@contextlib.contextmanager
def fake_gpu_sessions(monkeypatch, transport: str = "mpi-host", kernels: bool = True):
    """Within: engine.runner opens every session on the current fake device with
    ``transport``; the peak measurement is skipped (an 8192^3 GEMM), memory is the host's.
    Pass the communicator through :func:`fakes.mpi.checked_comm`."""
    from spmd_moe.engine import runner

    assert transport in DEVICE_TRANSPORTS, transport

    def choose(comm, backend, requested, node_rank, node_size):
        return (CHOICE, AWARE, TransportChoice(transport, "fake device"))

    with monkeypatch.context() as patch:
        patch.setattr(runner, "choose_backend_and_transport", choose)
        patch.setattr(runner, "Backend",
                      lambda choice, dtype: FakeGpuBackend(choice, dtype, kernels))
        patch.setattr(runner, "make_transport", make_fake_transport)
        patch.setattr(runner, "available_memory",
                      lambda choice, node_size: host_memory(node_size))
        patch.setattr(runner, "measure_peak", lambda bk: (1e12, "fake device"))
        yield


def run_on_fake_gpu(monkeypatch, comm, config, batch, layout=None, transport="mpi-host",
                    decode_tokens=0, eos=None, kernels=True, seed=0):
    """The engine (engine.testing.run_layout) on a fresh fake device of ``seed`` (each rank
    its own interleaving: the seed and the rank), through ``transport``; outputs on rank 0.
    Returns (outputs, the device)."""
    from spmd_moe.engine.testing import run_layout

    from .device import FakeDevice

    rank = comm.Get_rank()
    with FakeDevice(seed=[seed, rank]) as device, \
            fake_gpu_sessions(monkeypatch, transport, kernels):
        outputs = run_layout(checked_comm(comm), config, batch, layout, decode_tokens, eos)
        device.synchronize()
    return outputs, device
