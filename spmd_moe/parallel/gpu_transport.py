"""Building the transport of a run: the host transport on NumPy, and on CuPy the device
transport a :class:`~.transport.TransportChoice` names (``mpi-cuda``: mpi_device.py's
CudaAwareMpiTransport; ``mpi-host``: its PinnedHostMpiTransport; ``nccl``: nccl.py).

Every transport has :class:`~.transport.HostMpiTransport`'s methods and contracts (counts
and displacements in rows; ``alltoall_counts`` always on the host), device transports
taking and returning device arrays where the host transport takes host arrays. Host arrays
(the decode path's int64 token ids) go over plain host MPI on every transport; ``recv``
returns a host array for integer and bool dtypes and a device array for every float dtype.
"""
from __future__ import annotations

from ..backend.array import Backend
from ..core.errors import ConfigError
from .device import DeviceOps
from .mpi_device import CudaAwareMpiTransport, PinnedHostMpiTransport
from .nccl import NcclTransport
from .transport import HostMpiTransport, MpiLibrary, mpi_library


def make(choice, backend: Backend, world=None, ops: DeviceOps | None = None,
         library: MpiLibrary | None = None, nccl=None):
    """The transport object for ``choice`` (a :class:`~spmd_moe.parallel.transport.TransportChoice`)
    on a device backend. ``ops``, ``library`` and ``nccl`` are for tests."""
    if choice.name == "mpi-cuda":
        return CudaAwareMpiTransport(backend, choice.reason,
                                     library if library is not None else mpi_library(), ops)
    if choice.name == "mpi-host":
        return PinnedHostMpiTransport(backend, choice.reason, ops)
    if choice.name == "nccl":
        if backend.choice.shared_device:
            raise ConfigError("transport", "nccl cannot put several ranks on one GPU (NCCL "
                                           "refuses duplicate devices in a communicator); "
                                           "use mpi-host, or one rank per GPU")
        return NcclTransport(backend, choice.reason, ops, nccl)
    raise ValueError(f"no device transport named {choice.name!r}")


def make_transport(choice, backend: Backend, world=None):
    """The transport object for ``choice`` on any backend: the host transport on NumPy, a
    device transport (:func:`make`) on CuPy. It lives here, above transport.py, so that
    transport.py never imports the device transports back."""
    if not backend.on_gpu:
        return HostMpiTransport(backend, choice.reason)
    return make(choice, backend, world)


