"""Token dispatch and combine: each routed row to its expert and back (SPEC §3).

A dispatcher runs inside a stage pass (overlap.py) as two generators, each exchange
started, yielded and resumed with its result, the compute between them timed by phase:

    dispatch_steps(b, top_experts) -> (rows for the local experts [Rr, d], DispatchPlan)
        permute: sort the rows by expert, gather them; their counts start to the host
        [count exchange: Ialltoall of [P, El] counts]    (EP)
        [dispatch: Ialltoallv of the rows]               (EP)
        permute: regroup received rows by local expert   (EP, several local experts)
    combine_steps(expert rows, plan, weights) -> moe float32 [T, d]
        unpermute: back into received order              (EP, several local experts)
        [combine: the reverse Ialltoallv (EP), or the allreduce of float32 partials (TP)]
        unpermute: un-permute and the weighted sum over each token's k experts (float32)

Blocking is the same steps run to their end (overlap.run_pass). :class:`AlltoallDispatcher`
is expert parallel; :class:`AllreduceDispatcher` is the tensor-parallel baseline (every rank
holds every expert's slice of F: rows stay put, their partial outputs are summed).

Counts reach the host by an asynchronous copy (Backend.to_host_async): the host waits for
them at the count exchange, not at the sort. A token whose router logits were not finite
was routed to the sentinel expert E (router.py): the counts' last bin, refused here with
a :class:`~..core.errors.NumericalFault` before any row moves.

Padding never reaches here: tokens are packed (model/blocks.py). Notation: T tokens on this
rank, k top-k, R = T*k routed rows, Rr rows received, P ranks in the stage, E experts, El
experts per rank, d width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend.array import F32, Backend, HostCopy
from ..core.errors import NumericalFault
from ..parallel.overlap import CHECKPOINT
from ..parallel.transport import allreduce_bytes


@dataclass(frozen=True)
class Routing:
    """This rank's routed rows sorted by expert (after the sort, before any exchange)."""

    order: object          # [R] device: pair index t*k+j of each send row, by expert
    counts: HostCopy       # [E + 1] rows per expert (last: the router's sentinel), in flight


@dataclass(frozen=True)
class DispatchPlan:
    """One layer's dispatch and combine on one rank, whole once the counts are known (host
    arrays small, device arrays per row). The exchange fields are None under TP, where
    rows stay put."""

    order: object                              # [R] device
    tokens_per_expert_host: np.ndarray         # [E] rows this rank sends to each expert
    tokens_per_local_expert_host: np.ndarray   # [El] rows each local expert gets
    send_counts_host: np.ndarray | None = None     # [P] rows to each rank (EP)
    recv_counts_host: np.ndarray | None = None     # [P] rows from each rank
    recv_by_expert_host: np.ndarray | None = None  # [P, El] from each rank per expert
    expert_order: object | None = None         # [Rr] device: received row of each grouped row


class Dispatcher:
    """What every layout shares: sort by expert, gather, un-permute and weight."""

    partial_dtype = None   # expert outputs are whole: stored in the storage dtype

    def __init__(self, backend: Backend, comm, transport, n_experts: int, top_k: int,
                 local_experts: range):
        self.bk, self.comm, self.transport = backend, comm, transport
        self.n_experts, self.top_k = n_experts, top_k
        self.local_experts = local_experts
        self.peers = comm.Get_size()
        self.rank = comm.Get_rank()

    def sort(self, top_experts) -> Routing:
        """top_experts: int32 [T, k] -> the rows' order by expert (the sentinel E last) and
        their counts per expert, on their way to the host."""
        kernels = self.bk.kernels
        if kernels is not None and kernels.fuses("router"):
            order, counts = kernels.expert_order(top_experts, self.n_experts)  # one launch
        else:
            xp = self.bk.xp
            flat = top_experts.reshape(-1)                                     # [R]
            order = xp.argsort(flat, kind="stable") if xp is np else xp.argsort(flat)
            counts = xp.bincount(flat, minlength=self.n_experts + 1)
        return Routing(order, self.bk.to_host_async(counts))

    def permute(self, x, routing: Routing):
        """x: [T, d] -> send rows [R, d], grouped by expert (hence by destination rank)."""
        if self.bk.kernels is not None:
            return self.bk.kernels.gather_rows(x, routing.order, self.top_k)
        return self.bk.take_rows(x, routing.order // self.top_k)

    def tokens_per_expert(self, routing: Routing) -> np.ndarray:
        """int64 [E]: this rank's rows per expert (the host waits for the counts' copy);
        refuses tokens whose router logits were not finite."""
        counts = routing.counts.wait().astype(np.int64)                       # [E + 1]
        if counts[self.n_experts]:
            tokens = int(counts[self.n_experts]) // self.top_k
            raise NumericalFault(f"non-finite router logits (NaN, inf or no finite value) "
                                 f"for {tokens} token(s) of rank {self.rank}")
        return counts[:self.n_experts]

    def unpermute(self, rows, order, weights):
        """rows: [R, d] in send order, weights: float32 [T, k] -> moe float32 [T, d]:
        un-permute, then the weighted sum over each token's k experts in float32."""
        if self.bk.kernels is not None:
            return self.bk.kernels.unpermute_weighted(rows, order, weights)
        xp = self.bk.xp
        n_tokens = weights.shape[0]
        unsorted = xp.empty_like(rows)
        self.bk.put_rows(unsorted, order, rows)
        unsorted = unsorted.reshape(n_tokens, self.top_k, rows.shape[1])   # [T, k, d]
        moe = weights[:, 0, None] * unsorted[:, 0].astype(F32)
        for j in range(1, self.top_k):
            moe += weights[:, j, None] * unsorted[:, j].astype(F32)
        return moe

    def _sorted_rows(self, b, top_experts, timer):
        with timer.phase("permute"):
            routing = self.sort(top_experts)
            send = self.permute(b, routing)                                  # [R, d]
        return routing, send

    def dispatch_steps(self, b, top_experts, timer, flight, meanwhile=None):
        """b: [T, d], top_experts int32 [T, k] -> ``(rows [Rr, d] grouped by local
        expert, DispatchPlan)``. A generator of the pass (module docstring).
        ``meanwhile()``, if given, runs while the rows move (a shared expert: the caller
        keeps its result)."""
        raise NotImplementedError

    def combine_steps(self, rows, plan: DispatchPlan, weights, timer, flight):
        """rows: the local experts' outputs [Rr, d] (``partial_dtype`` or the storage
        dtype), weights float32 [T, k] -> moe float32 [T, d]. A generator of the pass."""
        raise NotImplementedError


class AlltoallDispatcher(Dispatcher):
    """Expert parallel: Alltoallv to the experts' ranks and back."""

    def dispatch_steps(self, b, top_experts, timer, flight, meanwhile=None):
        routing, send = self._sorted_rows(b, top_experts, timer)
        yield CHECKPOINT
        sent: list[np.ndarray] = []

        def start_counts():
            tokens = self.tokens_per_expert(routing)                         # [E]
            sent.append(tokens)
            return self.transport.ialltoall_counts(self.comm,
                                                   tokens.reshape(self.peers, -1))
        count_bytes = (self.peers - 1) * len(self.local_experts) * 8
        recv_by_expert = yield flight.start("count_exchange", start_counts,
                                            count_bytes)                    # [P, El]
        with timer.phase("permute"):
            plan = self._plan(routing, sent[0], recv_by_expert)
        started = flight.start(
            "dispatch", lambda: self.transport.ialltoallv(
                self.comm, send, plan.send_counts_host, plan.recv_counts_host),
            self._to_peers(plan.send_counts_host, send))
        if meanwhile is not None:
            meanwhile()
        received = yield started                                            # [Rr, d]
        with timer.phase("permute"):
            grouped = (received if plan.expert_order is None
                       else self.bk.take_rows(received, plan.expert_order))
        return grouped, plan

    def _plan(self, routing: Routing, tokens: np.ndarray,
              recv_by_expert: np.ndarray) -> DispatchPlan:
        """The plan, from this rank's counts per expert and the [P, El] counts received;
        with several local experts, the regrouping by expert of the received rows."""
        expert_order = None
        if len(self.local_experts) > 1:
            starts = displacements_2d(recv_by_expert)                         # [P, El]
            lengths = recv_by_expert.T.ravel()                                # expert-major
            group_starts = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1], out=group_starts[1:])
            index = (np.repeat(starts.T.ravel() - group_starts, lengths)
                     + np.arange(int(lengths.sum()), dtype=np.int64))
            expert_order = self.bk.asarray(index)
        return DispatchPlan(routing.order, tokens, recv_by_expert.sum(axis=0),
                            tokens.reshape(self.peers, -1).sum(axis=1),
                            recv_by_expert.sum(axis=1), recv_by_expert, expert_order)

    def combine_steps(self, rows, plan: DispatchPlan, weights, timer, flight):
        with timer.phase("unpermute"):
            back = rows
            if plan.expert_order is not None:                  # back into received order
                back = self.bk.xp.empty_like(rows)
                self.bk.put_rows(back, plan.expert_order, rows)
        returned = yield flight.start(
            "combine", lambda: self.transport.ialltoallv(
                self.comm, back, plan.recv_counts_host, plan.send_counts_host),
            self._to_peers(plan.recv_counts_host, back))                    # [R, d]
        with timer.phase("unpermute"):
            return self.unpermute(returned, plan.order, weights)            # [T, d] f32

    def _to_peers(self, counts_host: np.ndarray, rows) -> int:
        """Bytes of ``counts_host`` rows of ``rows``' width that leave this rank."""
        others = np.arange(self.peers) != self.rank
        return int(counts_host[others].sum()) * int(rows.shape[1]) * rows.dtype.itemsize


class AllreduceDispatcher(Dispatcher):
    """Tensor-parallel baseline: all experts local (a slice of F each); rows stay put and the
    partial outputs are summed across the tensor-parallel group."""

    partial_dtype = F32    # partial sums stay float32 until the allreduce has added them

    def dispatch_steps(self, b, top_experts, timer, flight, meanwhile=None):
        routing, send = self._sorted_rows(b, top_experts, timer)
        yield CHECKPOINT
        if meanwhile is not None:
            meanwhile()
        with timer.phase("permute"):
            tokens = self.tokens_per_expert(routing)
        return send, DispatchPlan(routing.order, tokens, tokens)

    def combine_steps(self, rows, plan: DispatchPlan, weights, timer, flight):
        """Sum each row's float32 partial outputs over the TP group, then round: the whole
        expert output ``GELU(b W1) W2`` is then stored in dtype before the weighted sum, as
        SPEC §1 has it (and as Megatron reduces permuted rows before un-permuting)."""
        summed = yield flight.start(
            "combine", lambda: self.transport.iallreduce_sum(self.comm, rows),
            allreduce_bytes(int(rows.shape[0]) * int(rows.shape[1]) * 4, self.peers))
        with timer.phase("combine"):
            rows = self.bk.store(summed)                  # rounded once, after the sum
        with timer.phase("unpermute"):
            return self.unpermute(rows, plan.order, weights)               # [T, d] f32


def displacements_2d(counts: np.ndarray) -> np.ndarray:
    """Start row of each (source, expert) block in row-major (source-major) order."""
    flat = counts.ravel()
    starts = np.zeros(len(flat), dtype=np.int64)
    np.cumsum(flat[:-1], out=starts[1:])
    return starts.reshape(counts.shape)
