"""MPI as the fake device sees it: :func:`checked_comm` wraps an mpi4py communicator so that
every buffer handed to MPI is checked against the fake device's queued work at the moment
of the host call (device.FakeDevice.check_host_access): a send buffer that queued work will
still write, or a receive buffer that queued work still reads or writes, is a
DeviceHazard. MPI then reads or writes the memory itself, at once (eager sends) or while
the request is in flight. Communicators made from a checked one (Dup, Split, ...) are
checked too; everything else passes through."""
from __future__ import annotations

from mpi4py import MPI

from .device import current

# Buffer arguments by position: (sent, received) for each data-moving call.
BUFFERS = {
    "Send": ((0,), ()), "Isend": ((0,), ()), "Ssend": ((0,), ()), "Issend": ((0,), ()),
    "Recv": ((), (0,)), "Irecv": ((), (0,)),
    "Sendrecv": ((0,), (2,)),
    "Alltoall": ((0,), (1,)), "Ialltoall": ((0,), (1,)),
    "Alltoallv": ((0,), (1,)), "Ialltoallv": ((0,), (1,)),
    "Allreduce": ((0,), (1,)), "Iallreduce": ((0,), (1,)),
    "Allgather": ((0,), (1,)), "Iallgather": ((0,), (1,)),
    "Bcast": ((), (0,)), "Ibcast": ((), (0,)),
}
MAKERS = ("Dup", "Split", "Split_type", "Create", "Create_group", "Clone")


def _buffer(spec):
    """The array of an mpi4py buffer spec (an array, or [array, counts..., type])."""
    if isinstance(spec, (list, tuple)) and spec:
        return spec[0]
    return spec


class CheckedComm:
    """An mpi4py communicator whose buffer-passing calls are checked first (module
    docstring). ``raw`` is the communicator itself."""

    def __init__(self, comm):
        self.raw = comm

    def __getattr__(self, name):
        attr = getattr(self.raw, name)
        if name in MAKERS:
            return lambda *args, **kwargs: CheckedComm(attr(*args, **kwargs))
        if name not in BUFFERS:
            return attr
        sent, received = BUFFERS[name]

        def call(*args, **kwargs):
            device = current()
            in_place = any(_buffer(args[i]) is MPI.IN_PLACE for i in sent if i < len(args))
            for i in sent:
                if i < len(args) and _buffer(args[i]) is not MPI.IN_PLACE:
                    device.check_host_access(_buffer(args[i]), False, f"MPI {name}")
            for i in received:
                if i < len(args):
                    # In place, the received buffer is also what is sent: read and written.
                    device.check_host_access(_buffer(args[i]), True,
                                             f"MPI {name}" + (" in place" if in_place else ""))
            return attr(*args, **kwargs)
        return call

    def __eq__(self, other):
        return self.raw == getattr(other, "raw", other)

    def __hash__(self):
        return hash(self.raw)


def checked_comm(comm) -> CheckedComm:
    return comm if isinstance(comm, CheckedComm) else CheckedComm(comm)


def unwrap(comm):
    """The mpi4py communicator behind a checked one."""
    return getattr(comm, "raw", comm)
