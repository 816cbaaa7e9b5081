"""Who owns what: the process grid of SPEC §2, built once and passed down.

World rank ``r`` sits in pipeline stage ``r // group`` at group rank ``r % group``
(``group = ep`` for the expert-parallel layout, ``tp`` for the tensor-parallel baseline).
A stage owns a contiguous block of layers. Within a stage:

- expert parallel: group rank ``e`` owns experts ``[e*E/ep, (e+1)*E/ep)`` of each of the
  stage's layers, a full copy of the stage's attention weights, and runs attention for its
  own contiguous block of the batch's sequences (data parallel);
- tensor parallel: group rank ``t`` owns heads ``[t*H/tp, (t+1)*H/tp)`` (and the key/value
  heads they use, see ``Grid.kv_heads``) and columns
  ``[t*F/tp, (t+1)*F/tp)`` of every expert's hidden layer, for all sequences.

:class:`Grid` is the pure rank arithmetic (``plan`` uses it without MPI); :class:`Topology`
adds the communicators. No other module computes ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Layout, ModelConfig


def block_range(n: int, parts: int, index: int) -> range:
    """The ``index``-th of ``parts`` contiguous blocks of ``range(n)``; the first
    ``n % parts`` blocks are one longer."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


@dataclass(frozen=True)
class Grid:
    """Rank arithmetic for one rank of a layout (no communicators)."""

    layout: Layout
    model: ModelConfig
    rank: int

    @property
    def stage(self) -> int:
        return self.rank // self.layout.group

    @property
    def group_rank(self) -> int:
        """Expert-rank (EP) or tensor-rank (TP) within the stage."""
        return self.rank % self.layout.group

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.pp - 1

    @property
    def layers(self) -> range:
        return block_range(self.model.n_layers, self.layout.pp, self.stage)

    @property
    def experts(self) -> range:
        """Experts of each owned layer whose weights this rank holds."""
        if self.layout.tp > 1:
            return range(self.model.n_experts)
        per_rank = self.model.n_experts // self.layout.ep
        return range(self.group_rank * per_rank, (self.group_rank + 1) * per_rank)

    @property
    def heads(self) -> range:
        return block_range(self.model.n_heads, self.layout.tp, self.group_rank
                           if self.layout.tp > 1 else 0)

    @property
    def kv_heads(self) -> range:
        """Key/value heads this rank holds: all of them (EP), or under TP those its query
        heads use: a block of H_kv/tp (tp divides H_kv) or the one head that its query
        heads share (H_kv divides tp; that head is replicated on tp/H_kv ranks)."""
        if self.layout.tp == 1:
            return range(self.model.kv_heads)
        group = self.model.n_heads // self.model.kv_heads
        heads = self.heads
        return range(heads.start // group, (heads.stop - 1) // group + 1)

    @property
    def ff_columns(self) -> range:
        """Columns of W1 (rows of W2) this rank holds for each of its experts."""
        return self.tp_slice(self.model.d_ff)

    def tp_slice(self, width: int) -> range:
        """This rank's block of a ``width`` split over the tensor-parallel group (all of it
        under expert parallelism): an expert's F, a shared expert's, a dense MLP's."""
        return block_range(width, self.layout.tp, self.group_rank if self.layout.tp > 1
                           else 0)

    def sequences(self, batch_size: int) -> range:
        """Sequences whose attention this rank runs (all of them under TP)."""
        if self.layout.tp > 1:
            return range(batch_size)
        return block_range(batch_size, self.layout.ep, self.group_rank)

    def expert_rank_of(self, expert: int) -> int:
        """Group rank that owns ``expert`` (expert parallel)."""
        return expert // (self.model.n_experts // self.layout.ep)

    @property
    def writes_outputs(self) -> bool:
        """Whether this rank's last-stage outputs are unique (TP ranks hold copies)."""
        return self.group_rank == 0 or self.layout.tp == 1

    def micro_batches(self, batch_size: int, requested: int) -> list[range]:
        """This rank's sequences split into the stage-wide number of micro-batches; every
        rank of a stage gets the same count (some may be empty), so collectives pair up."""
        count = requested or self.layout.pp
        mine = self.sequences(batch_size)
        return [range(mine.start + r.start, mine.start + r.stop)
                for r in (block_range(len(mine), count, m) for m in range(count))]


class Topology(Grid):
    """A :class:`Grid` plus its communicators.

    - ``world``: every rank.
    - ``stage_comm``: the ranks of this stage (rank in it = group rank); dispatch and
      combine (EP) or the allreduces (TP) run on it. ``stage_comms``: it and a duplicate,
      one per micro-batch in flight (overlap.py: the two passes' collectives may interleave
      differently on different ranks, so each keeps to its own communicator).
    - ``pipe_comm``: the ranks with this group rank across stages (rank in it = stage);
      hidden states go from stage s to s+1 on it.
    - ``node_comm``: ranks sharing this node's memory, for binding ranks to GPUs.
    """

    def __init__(self, world: Any, layout: Layout, model: ModelConfig):
        layout.validate(model, world.Get_size())
        super().__init__(layout, model, world.Get_rank())
        from mpi4py import MPI

        self.world = world
        self.size = world.Get_size()
        self.stage_comm = world.Split(self.stage, self.rank)
        self.stage_comms = (self.stage_comm, self.stage_comm.Dup())
        self.pipe_comm = world.Split(self.group_rank, self.rank)
        self.node_comm = world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        assert self.stage_comm.Get_rank() == self.group_rank
        assert self.pipe_comm.Get_rank() == self.stage

    # A frozen dataclass parent: set attributes through object.__setattr__.
    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @property
    def node_rank(self) -> int:
        return self.node_comm.Get_rank()

    @property
    def node_size(self) -> int:
        return self.node_comm.Get_size()

    def free(self) -> None:
        for comm in (*self.stage_comms, self.pipe_comm, self.node_comm):
            comm.Free()
