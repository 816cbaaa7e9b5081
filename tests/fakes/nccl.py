"""CuPy's NCCL on the fake device: :class:`FakeNccl` (the ``cupy.cuda.nccl`` module, and a
``communicator_factory`` for parallel.nccl.NcclTransport) and its communicators.

A call (``send``, ``recv``, ``allReduce``, or a group of them between ``groupStart`` and
``groupEnd``) is queued on the stream it names, as NCCL queues a kernel. When the stream
reaches it, its transfers are posted as MPI requests on a communicator of its own (a Dup of
the MPI communicator it was made from, so two NCCL communicators never match each other's
messages), reading and writing device memory from then on; the stream stays there until
every request completes, as an NCCL kernel spins until its peers arrive. Two ranks that
queue their calls in orders that cannot match block forever: the fake device reports a
DeviceDeadlock. NCCL has no tags: messages between two ranks of a communicator arrive in
the order sent, which one MPI tag keeps.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .device import current
from .mpi import unwrap

TAG = 7


class FakeNccl:
    """The module (constants, groups, unique ids)."""

    NCCL_UINT8, NCCL_FLOAT32, NCCL_SUM = 1, 7, 0
    available = True

    def __init__(self):
        self.group: list | None = None
        self.made: list = []

    def get_unique_id(self):
        return tuple(range(128))

    def groupStart(self) -> None:
        assert self.group is None, "nested NCCL groups"
        self.group = []

    def groupEnd(self) -> None:
        calls, self.group = self.group, None
        if calls:
            streams = {stream for _, _, stream in calls}
            assert len(streams) == 1, "one NCCL group on one stream"
            calls[0][0].queue([(comm, item) for comm, item, _ in calls], streams.pop())

    def communicator(self, comm) -> "FakeNcclComm":
        """A communicator over the ranks of MPI ``comm`` (collective on it)."""
        made = FakeNcclComm(self, unwrap(comm).Dup())
        self.made.append(made)
        return made

    def NcclCommunicator(self, size, unique_id, rank):
        raise AssertionError("the fake NCCL makes communicators with communicator(comm)")


class FakeNcclComm:
    """One NCCL communicator: calls queued on the fake device's streams."""

    def __init__(self, nccl: FakeNccl, comm):
        self.nccl, self.comm = nccl, comm

    def _call(self, item, stream: int) -> None:
        if self.nccl.group is not None:
            self.nccl.group.append((self, item, stream))
        else:
            self.queue([(self, item)], stream)

    def send(self, ptr, nbytes, datatype, peer, stream):
        assert datatype == FakeNccl.NCCL_UINT8
        self._call(("send", ptr, nbytes, peer), stream)

    def recv(self, ptr, nbytes, datatype, peer, stream):
        assert datatype == FakeNccl.NCCL_UINT8
        self._call(("recv", ptr, nbytes, peer), stream)

    def allReduce(self, send_ptr, recv_ptr, count, datatype, op, stream):
        assert datatype == FakeNccl.NCCL_FLOAT32 and op == FakeNccl.NCCL_SUM
        self._call(("allreduce", send_ptr, recv_ptr, count), stream)

    def queue(self, calls, stream_ptr: int) -> None:
        device = current()
        reads, writes, names = [], [], []
        for comm, item in calls:
            kind = item[0]
            names.append(f"{kind}" + (f" peer {item[3]}" if kind != "allreduce" else ""))
            if kind == "send":
                reads.append((item[1], item[1] + item[2]))
            elif kind == "recv":
                writes.append((item[1], item[1] + item[2]))
            else:
                reads.append((item[1], item[1] + 4 * item[3]))
                writes.append((item[2], item[2] + 4 * item[3]))

        def start():
            requests = []
            for comm, item in calls:
                kind = item[0]
                if kind == "send":
                    requests.append(comm.comm.Isend(device_bytes(item[1], item[2]),
                                                    dest=item[3], tag=TAG))
                elif kind == "recv":
                    requests.append(comm.comm.Irecv(device_bytes(item[1], item[2]),
                                                    source=item[3], tag=TAG))
                else:
                    _, send, recv, count = item
                    target = device_bytes(recv, 4 * count).view(np.float32)
                    source = MPI.IN_PLACE if send == recv else device_bytes(
                        send, 4 * count).view(np.float32)
                    requests.append(comm.comm.Iallreduce(source, target, op=MPI.SUM))
            return requests

        device.enqueue("nccl " + ", ".join(names), None, reads=reads, writes=writes,
                       stream=device.stream_of(stream_ptr), kind="nccl", start=start)

    def destroy(self) -> None:
        self.comm.Free()


def device_bytes(address: int, nbytes: int) -> np.ndarray:
    """uint8 view of fake-device memory at ``address``."""
    device = current()
    segment = device.segment_of(address)
    assert segment is not None, "NCCL buffer not in device memory"
    offset = address - segment.ctypes.data
    return segment[offset:offset + nbytes]
