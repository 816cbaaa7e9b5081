"""Token dispatch and combine: getting each routed row to its expert and back.

Phases, as methods so that each is timed (and overlapped) on its own:

    dispatch_preprocess -> permute -> exchange_counts -> token_dispatch -> dispatch_postprocess
        ... experts ...
    combine_preprocess -> token_combine -> combine_postprocess

``token_dispatch`` and ``token_combine`` block; ``start_dispatch`` and ``start_combine``
start the same exchanges without waiting (a transport.PendingExchange whose ``Wait()`` gives
what the blocking ones return, before ``finish_combine``), so that the engine can run another
micro-batch's compute meanwhile (overlap.py).

:class:`AlltoallDispatcher` (expert parallel): rows are sorted by destination expert, the
per-expert row counts are exchanged with one Alltoall, the rows go by Alltoallv, are
regrouped by local expert, and come back the same way in reverse.
:class:`AllreduceDispatcher` (tensor-parallel baseline): every rank holds every expert's
slice of F, so rows stay put and each row's partial expert outputs are summed by allreduce.

Padding never reaches here: tokens are packed (model/blocks.py). Notation: T tokens on this rank,
k top-k, R = T*k routed rows, P ranks in the stage, E experts, El experts per rank, d width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend.array import F32, Backend
from ..parallel.transport import allreduce_bytes


@dataclass
class DispatchPlan:
    """Bookkeeping for one layer's dispatch and combine on one rank (host arrays are small,
    backend arrays are per row)."""

    order: object                          # [R] pair index t*k+j of each send row, by expert
    tokens_per_expert_host: np.ndarray     # [E] rows this rank sends to each expert
    send_counts_host: np.ndarray | None = None        # [P] rows to each rank (EP)
    recv_counts_host: np.ndarray | None = None        # [P] rows from each rank
    recv_by_expert_host: np.ndarray | None = None     # [P, El] rows from each rank per expert
    tokens_per_local_expert_host: np.ndarray | None = None  # [El] rows each local expert gets
    expert_order: object | None = None     # [Rr] received row of each expert-grouped row


class Dispatcher:
    """The layout-independent halves: sort by expert, gather, un-permute and weight."""

    def __init__(self, backend: Backend, comm, transport, n_experts: int, top_k: int,
                 local_experts: range):
        self.bk, self.comm, self.transport = backend, comm, transport
        self.n_experts, self.top_k = n_experts, top_k
        self.local_experts = local_experts
        self.peers = comm.Get_size()
        self.rank = comm.Get_rank()

    def dispatch_preprocess(self, top_experts) -> DispatchPlan:
        """top_experts: int32 [T, k] -> the sort order and counts (one device->host copy of
        E counts: the bulk-synchronous loop needs them on the host for MPI)."""
        kernels = self.bk.kernels
        if kernels is not None and kernels.fuses("router"):
            order, counts = kernels.expert_order(top_experts, self.n_experts)  # one launch
            return DispatchPlan(order, self.bk.to_host(counts).astype(np.int64))
        xp = self.bk.xp
        flat = top_experts.reshape(-1)                                     # [R]
        order = xp.argsort(flat, kind="stable") if xp is np else xp.argsort(flat)
        per_expert = self.bk.to_host(xp.bincount(flat, minlength=self.n_experts))
        return DispatchPlan(order, per_expert.astype(np.int64))

    def permute(self, x, plan: DispatchPlan):
        """x: [T, d] -> send rows [R, d], grouped by expert (hence by destination rank)."""
        if self.bk.kernels is not None:
            return self.bk.kernels.gather_rows(x, plan.order, self.top_k)
        return self.bk.take_rows(x, plan.order // self.top_k)

    def combine_postprocess(self, rows, plan: DispatchPlan, weights):
        """rows: [R, d] in send order, weights: float32 [T, k] -> moe float32 [T, d]:
        un-permute, then the weighted sum over each token's k experts in float32."""
        if self.bk.kernels is not None:
            return self.bk.kernels.unpermute_weighted(rows, plan.order, weights)
        xp = self.bk.xp
        n_tokens = weights.shape[0]
        unsorted = xp.empty_like(rows)
        self.bk.put_rows(unsorted, plan.order, rows)
        unsorted = unsorted.reshape(n_tokens, self.top_k, rows.shape[1])   # [T, k, d]
        moe = weights[:, 0, None] * unsorted[:, 0].astype(F32)
        for j in range(1, self.top_k):
            moe += weights[:, j, None] * unsorted[:, j].astype(F32)
        return moe



class AlltoallDispatcher(Dispatcher):
    """Expert parallel: Alltoallv to the experts' ranks and back."""

    partial_dtype = None   # expert outputs are whole: stored in the storage dtype
    exchanges_rows = True  # dispatch moves rows between ranks

    def exchange_counts(self, plan: DispatchPlan) -> int:
        """One Alltoall of [P, El] counts; returns bytes sent to other ranks."""
        self.finish_counts(plan, self.transport.alltoall_counts(self.comm,
                                                                self._counts_by_peer(plan)))
        return self.count_bytes(plan)

    def start_counts(self, plan: DispatchPlan):
        """:meth:`exchange_counts`, started (Ialltoall); its ``Wait()`` gives the [P, El]
        counts for :meth:`finish_counts`. Non-blocking because two passes in flight may
        interleave differently on different ranks: a blocking collective inside a pass could
        wait on a rank that is itself blocked in the other pass's (overlap.py)."""
        return self.transport.ialltoall_counts(self.comm, self._counts_by_peer(plan))

    def finish_counts(self, plan: DispatchPlan, recv_by_expert_host: np.ndarray) -> None:
        plan.recv_by_expert_host = recv_by_expert_host                        # [P, El]
        plan.recv_counts_host = recv_by_expert_host.sum(axis=1)
        plan.tokens_per_local_expert_host = recv_by_expert_host.sum(axis=0)

    def count_bytes(self, plan: DispatchPlan) -> int:
        """Bytes of counts sent to other ranks."""
        return plan.tokens_per_expert_host.reshape(self.peers, -1)[
            np.arange(self.peers) != self.rank].nbytes

    def _counts_by_peer(self, plan: DispatchPlan) -> np.ndarray:
        by_peer = plan.tokens_per_expert_host.reshape(self.peers, -1)        # [P, El]
        plan.send_counts_host = by_peer.sum(axis=1)
        return by_peer

    def token_dispatch(self, send_rows, plan: DispatchPlan):
        """send rows [R, d] -> received rows [Rr, d] grouped by source rank, then expert."""
        return self.transport.alltoallv(self.comm, send_rows, plan.send_counts_host,
                                        plan.recv_counts_host)

    def dispatch_postprocess(self, recv_rows, plan: DispatchPlan):
        """Regroup received rows by local expert (a no-op with one expert per rank)."""
        if len(self.local_experts) == 1:
            return recv_rows
        counts = plan.recv_by_expert_host                                   # [P, El]
        starts = displacements_2d(counts)                                   # [P, El]
        lengths = counts.T.ravel()                                          # expert-major
        group_starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=group_starts[1:])
        index = (np.repeat(starts.T.ravel() - group_starts, lengths)
                 + np.arange(int(lengths.sum()), dtype=np.int64))
        plan.expert_order = self.bk.asarray(index)
        return self.bk.take_rows(recv_rows, plan.expert_order)

    def combine_preprocess(self, expert_rows, plan: DispatchPlan):
        """Expert outputs back into received order (source rank, then expert)."""
        if plan.expert_order is None:
            return expert_rows
        back = self.bk.xp.empty_like(expert_rows)
        self.bk.put_rows(back, plan.expert_order, expert_rows)
        return back

    def token_combine(self, rows, plan: DispatchPlan):
        """The reverse Alltoallv: expert outputs go back to the ranks that sent the rows."""
        return self.transport.alltoallv(self.comm, rows, plan.recv_counts_host,
                                        plan.send_counts_host)

    def start_dispatch(self, send_rows, plan: DispatchPlan):
        """:meth:`token_dispatch`, started (Ialltoallv)."""
        return self.transport.ialltoallv(self.comm, send_rows, plan.send_counts_host,
                                         plan.recv_counts_host)

    def start_combine(self, rows, plan: DispatchPlan):
        """:meth:`token_combine`, started (Ialltoallv); finish with :meth:`finish_combine`."""
        return self.transport.ialltoallv(self.comm, rows, plan.recv_counts_host,
                                         plan.send_counts_host)

    def finish_combine(self, rows):
        return rows

    def dispatch_bytes(self, rows, plan: DispatchPlan) -> int:
        """Bytes of dispatched rows that leave this rank."""
        return self._to_peers(plan.send_counts_host, rows)

    def combine_bytes(self, rows, plan: DispatchPlan) -> int:
        return self._to_peers(plan.recv_counts_host, rows)

    def _to_peers(self, counts_host: np.ndarray, rows) -> int:
        others = np.arange(self.peers) != self.rank
        return int(counts_host[others].sum()) * int(rows.shape[1]) * rows.dtype.itemsize


class AllreduceDispatcher(Dispatcher):
    """Tensor-parallel baseline: all experts local (a slice of F each); rows stay put and the
    partial outputs are summed across the tensor-parallel group."""

    partial_dtype = F32    # partial sums stay float32 until the allreduce has added them
    exchanges_rows = False  # no dispatch: every rank holds every expert's F slice

    def exchange_counts(self, plan: DispatchPlan) -> int:
        plan.tokens_per_local_expert_host = plan.tokens_per_expert_host
        return 0

    def token_dispatch(self, send_rows, plan: DispatchPlan):
        return send_rows

    def dispatch_postprocess(self, recv_rows, plan: DispatchPlan):
        return recv_rows

    def combine_preprocess(self, expert_rows, plan: DispatchPlan):
        return expert_rows

    def token_combine(self, rows, plan: DispatchPlan):
        """Sum each row's float32 partial outputs over the TP group, then round: the whole
        expert output ``GELU(b W1) W2`` is then stored in dtype before the weighted sum, as
        SPEC §1 has it (and as Megatron reduces permuted rows before un-permuting)."""
        return self.bk.store(self.transport.allreduce_sum(self.comm, rows))

    def start_dispatch(self, send_rows, plan: DispatchPlan):
        raise AssertionError("the TP baseline dispatches nothing (exchanges_rows is False)")

    def start_combine(self, rows, plan: DispatchPlan):
        """:meth:`token_combine`'s allreduce, started (Iallreduce of the float32 partials,
        in place); finish with :meth:`finish_combine`."""
        return self.transport.iallreduce_sum(self.comm, rows)

    def finish_combine(self, rows):
        """Round the summed partials once (see :meth:`token_combine`)."""
        return self.bk.store(rows)

    def dispatch_bytes(self, rows, plan: DispatchPlan) -> int:
        return 0

    def combine_bytes(self, rows, plan: DispatchPlan) -> int:
        return allreduce_bytes(int(rows.shape[0]) * int(rows.shape[1]) * 4, self.peers)


def displacements_2d(counts: np.ndarray) -> np.ndarray:
    """Start row of each (source, expert) block in row-major (source-major) order."""
    flat = counts.ravel()
    starts = np.zeros(len(flat), dtype=np.int64)
    np.cumsum(flat[:-1], out=starts[1:])
    return starts.reshape(counts.shape)
