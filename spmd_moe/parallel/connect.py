"""Opening the backend and transport of a run: both chosen on every rank at once
(:func:`choose_backend_and_transport`), then the transport built (:func:`make_transport`):
the host transport on NumPy, and on CuPy the device transport the choice names
(``mpi-cuda``: mpi_device.py's CudaAwareMpiTransport; ``mpi-host``: its
PinnedHostMpiTransport; ``nccl``: nccl.py).

Every transport has :class:`~.transport.HostMpiTransport`'s methods and contracts (counts
and displacements in rows; ``ialltoall_counts`` always on the host), device transports
taking and returning device arrays where the host transport takes host arrays. Host arrays
(the decode path's int64 token ids) go over plain host MPI on every transport; ``irecv``
gives a host array for integer and bool dtypes and a device array for every float dtype.
"""
from __future__ import annotations

from ..backend.array import Backend, BackendChoice, choose_backend
from ..core.errors import ConfigError, collective
from .mpi_device import CudaAwareMpiTransport, PinnedHostMpiTransport
from .nccl import NcclTransport
from .transport import (HostMpiTransport, MpiLibrary, TransportChoice, choose_transport,
                        mpi_library, nccl_available)


def choose_backend_and_transport(comm, backend: str, transport: str, node_rank: int,
                                 node_size: int) -> tuple[BackendChoice, MpiLibrary,
                                                          TransportChoice]:
    """The backend and transport of a run, chosen on every rank of ``comm`` (collective: a
    refusal on one rank stops all of them with its error). ``backend`` and ``transport``
    are what was asked (``auto`` or a name); NCCL counts as available only on CuPy."""
    choice = collective(comm, choose_backend, backend, node_rank, node_size)
    library = mpi_library()
    transport_choice = collective(comm, choose_transport, transport, choice.name, library,
                                  choice.name == "cupy" and nccl_available())
    return choice, library, transport_choice


def make_transport(choice: TransportChoice, backend: Backend, library: MpiLibrary | None = None,
                   nccl=None):
    """The transport object for ``choice``: the host transport on NumPy, the device
    transport it names on a device backend. ``library`` and ``nccl`` (the MPI library's
    description, CuPy's NCCL module) are looked up unless given (tests give them)."""
    if not backend.on_gpu:
        return HostMpiTransport(backend, choice.reason)
    if choice.name == "mpi-cuda":
        return CudaAwareMpiTransport(backend, choice.reason,
                                     library if library is not None else mpi_library())
    if choice.name == "mpi-host":
        return PinnedHostMpiTransport(backend, choice.reason)
    if choice.name == "nccl":
        if backend.choice.shared_device:
            raise ConfigError("transport", "nccl cannot put several ranks on one GPU (NCCL "
                                           "refuses duplicate devices in a communicator); "
                                           "use mpi-host, or one rank per GPU")
        return NcclTransport(backend, choice.reason, nccl=nccl)
    raise ValueError(f"no device transport named {choice.name!r}")
