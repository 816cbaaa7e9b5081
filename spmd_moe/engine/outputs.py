"""A run's outputs gathered on rank 0: each last-stage rank that writes outputs sends the
rows of its sequences (hidden [b, S, d] float32, logits [b, V] float32, and for decode the
greedy tokens [b, N] int64); rank 0 places them in batch order. Expert counts are summed
by the engine."""
from __future__ import annotations

import numpy as np

from ..core.topology import Grid
from ..model.inputs import Batch
from .session import Session


def _contributors(session: Session, batch_size: int) -> list[range]:
    """For each world rank, the sequences whose outputs it sends to rank 0 (maybe none)."""
    topo = session.topo
    out = []
    for rank in range(topo.size):
        grid = Grid(topo.layout, topo.model, rank)
        useful = grid.is_last_stage and grid.writes_outputs
        out.append(grid.sequences(batch_size) if useful else range(0))
    return out


def _gather_rows(session: Session, rows: np.ndarray, counts: list[int], width: int,
                 dtype: np.dtype) -> np.ndarray | None:
    """Gatherv of [n, width] rows to world rank 0 (counts in rows)."""
    world, transport = session.topo.world, session.transport
    row_type = transport.row_type(dtype.itemsize, width)
    rows = np.ascontiguousarray(rows, dtype=dtype).reshape(-1, width)
    recv = None
    if world.Get_rank() == 0:
        counts_arr = np.asarray(counts, dtype=np.int64)
        starts = np.zeros_like(counts_arr)
        np.cumsum(counts_arr[:-1], out=starts[1:])
        recv = np.empty((int(counts_arr.sum()), width), dtype=dtype)
        world.Gatherv(transport.words(rows), [transport.words(recv), (counts_arr, starts),
                                              row_type], root=0)
    else:
        world.Gatherv([transport.words(rows), rows.shape[0], row_type], None, root=0)
    return recv


def gather_prefill(session: Session, batch: Batch, out):
    """``hidden`` float32 [B, S, d] (zero at padding), ``logits`` float32 [B, V] and
    ``expert_counts`` int64 [L, E] on world rank 0; ``None`` on other ranks."""
    with session.watchdog.waiting("gather outputs"):
        return _gather_prefill(session, batch, out)


def _gather_prefill(session: Session, batch: Batch, out):
    topo, bk, model = session.topo, session.backend, session.config.model
    world = topo.world
    counts = np.zeros_like(out.expert_counts)
    world.Reduce(out.expert_counts, counts, root=0)
    lengths = batch.lengths
    sources = _contributors(session, batch.batch_size)
    mine = sources[topo.rank]
    d, vocab = model.d_model, model.vocab_size
    if len(mine):
        logits = np.concatenate([bk.to_host(x) for x in out.logits]).astype(np.float32)
    else:
        logits = np.zeros((0, vocab), dtype=np.float32)
    all_logits = _gather_rows(session, logits, [len(s) for s in sources], vocab,
                              np.dtype(np.float32))
    if len(mine):
        hidden = np.concatenate([bk.to_host(x) for x in out.hidden])
    else:
        hidden = np.zeros((0, d), dtype=bk.dtype)
    token_counts = [int(lengths[s.start:s.stop].sum()) for s in sources]
    hidden_rows = _gather_rows(session, hidden, token_counts, d, bk.dtype)
    if topo.rank != 0:
        return None
    order = np.concatenate([np.arange(s.start, s.stop) for s in sources])
    result = {"logits": np.empty((batch.batch_size, vocab), dtype=np.float32),
              "expert_counts": counts}
    result["logits"][order] = all_logits
    full = np.zeros((batch.batch_size, batch.seq_len, d), dtype=np.float32)
    row = 0
    for seq in order:
        n = int(lengths[seq])
        full[seq, batch.seq_len - n:] = hidden_rows[row:row + n].astype(np.float32)
        row += n
    result["hidden"] = full
    return result


def gather_tokens(session: Session, batch: Batch, generated: list[list[np.ndarray]],
                  new_tokens: int) -> np.ndarray | None:
    """Greedy tokens int64 [B, N] on world rank 0 (-1 after a sequence stopped)."""
    with session.watchdog.waiting("gather outputs"):
        return _gather_tokens(session, batch, generated, new_tokens)


def _gather_tokens(session: Session, batch: Batch, generated: list[list[np.ndarray]],
                   new_tokens: int) -> np.ndarray | None:
    sources = _contributors(session, batch.batch_size)
    mine = sources[session.topo.rank]
    if len(mine):
        steps = [np.concatenate(step) for step in generated]         # N x [b]
        tokens = np.stack(steps, axis=1)                              # [b, N]
    else:
        tokens = np.zeros((0, new_tokens), dtype=np.int64)
    rows = _gather_rows(session, tokens, [len(s) for s in sources], new_tokens,
                        np.dtype(np.int64))
    if session.topo.rank != 0:
        return None
    order = np.concatenate([np.arange(s.start, s.stop) for s in sources])
    result = np.empty((batch.batch_size, new_tokens), dtype=np.int64)
    result[order] = rows
    return result
