"""The MoE half of a layer: route, dispatch, run the local experts, combine (SPEC §3), and
the families' additions to it (SPEC §8).

Each phase is timed on its own (``timer.phase``) and the bytes each sends to other ranks are
counted, which is what the report's per-phase table shows. :func:`moe_steps` is a step of a
stage pass (overlap.py): it yields the exchanges the dispatcher starts (the count exchange,
dispatch and combine, or the TP allreduce) and goes on with their results, so that another
micro-batch can compute meanwhile. One code path for every layout: the dispatcher decides
what moves.

A shared expert (``ModelConfig.d_shared``) needs no exchange: under expert parallelism it
runs on the token's own rank while the dispatch is in flight; under TP each rank holds its F
slice and its float32 partial is summed over the group by an allreduce of its own. Its
output is stored in dtype (as every expert output), then added to the weighted sum in
float32, times ``sigmoid(b W_sg)`` with a gate (Qwen2-MoE). A dense layer
(:func:`dense_steps`) is a SwiGLU MLP on the token's own rank (TP: F split, partials
allreduced), timed as ``experts`` (its allreduce as ``combine``).

Notation: T tokens on this rank, d width, E experts, k top-k.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import F32, PhaseTimer
from ..core.config import ModelConfig
from ..model.weights import LayerWeights
from ..parallel.overlap import CHECKPOINT, Flight
from ..parallel.transport import allreduce_bytes
from .dispatcher import Dispatcher
from .experts import expert_ffn, run_experts, sigmoid
from .router import route_for


def moe_steps(dispatcher: Dispatcher, b, lw: LayerWeights, model: ModelConfig,
              timer: PhaseTimer, flight: Flight):
    """b: [T, d] normalised hidden states (storage dtype) -> ``(moe float32 [T, d],
    tokens_per_expert int64 [E])``, the latter counting this rank's routed rows. ``model``
    says the router (top-k, renormalisation, DeepSeek's grouped sigmoid; the experts'
    matrices say their activation). A generator (overlap.py): the dispatcher's steps yield
    each exchange they start (dispatcher.py), and a checkpoint sits between the experts and
    the combine."""
    bk = dispatcher.bk
    with timer.phase("router"):
        top_experts, weights = route_for(bk, b, lw, model)                  # [T, k] each
    shared = []                     # the shared expert, computed while the dispatch moves
    grouped, plan = yield from dispatcher.dispatch_steps(
        b, top_experts, timer, flight,
        meanwhile=(lambda: shared.append(_shared(dispatcher, b, lw, timer)))
        if lw.shared is not None else None)
    with timer.phase("experts"):
        experts = [lw.experts[e] for e in dispatcher.local_experts]
        out = run_experts(bk, grouped, plan.tokens_per_local_expert_host, experts,
                          dispatcher.partial_dtype)                        # [Rr, d]
    timer.count("expert_rows", grouped.shape[0])
    yield CHECKPOINT
    moe = yield from dispatcher.combine_steps(out, plan, weights, timer, flight)  # [T, d]
    if shared:
        partial = yield from _summed(dispatcher, shared[0], timer, flight)
        with timer.phase("unpermute"):
            moe += _gated(bk, b, lw, partial)
    return moe, plan.tokens_per_expert_host


def _shared(dispatcher: Dispatcher, b, lw: LayerWeights, timer: PhaseTimer):
    """The layer's shared expert on b [T, d]: [T, d] in the storage dtype, or the float32
    partial of this rank's F slice under TP."""
    with timer.phase("experts"):
        w1, w2, w3 = lw.shared
        return expert_ffn(dispatcher.bk, b, w1, w2, dispatcher.partial_dtype, w3=w3)


def _summed(dispatcher: Dispatcher, out, timer: PhaseTimer, flight: Flight):
    """``out`` [T, d] summed over the TP group and rounded once (a float32 partial of the
    rank's F slice), or as it is under expert parallelism. A generator (the allreduce)."""
    if dispatcher.partial_dtype is None:
        return out
    summed = yield flight.start(
        "combine", lambda: dispatcher.transport.iallreduce_sum(dispatcher.comm, out),
        allreduce_bytes(int(out.shape[0]) * int(out.shape[1]) * 4, dispatcher.peers))
    with timer.phase("combine"):
        return dispatcher.bk.store(summed)


def _gated(bk, b, lw: LayerWeights, shared):
    """The shared expert's output [T, d] (storage dtype) as float32, times
    ``sigmoid(b W_sg)`` [T, 1] with a gate."""
    out = shared.astype(F32)
    if lw.shared_gate is None:
        return out
    return out * sigmoid(bk, bk.matmul(b, lw.shared_gate, out_dtype=F32))


def dense_steps(dispatcher: Dispatcher, b, lw: LayerWeights, n_experts: int,
                timer: PhaseTimer, flight: Flight):
    """A dense layer's MLP: b [T, d] -> ``(mlp float32 [T, d], zeros [E])`` (no routed
    rows). A generator: under TP it yields the allreduce of the float32 partials of the
    rank's F slice (on the dispatcher's communicator)."""
    bk = dispatcher.bk
    with timer.phase("experts"):
        w1, w2, w3 = lw.mlp
        out = expert_ffn(bk, b, w1, w2, dispatcher.partial_dtype, w3=w3)
    out = yield from _summed(dispatcher, out, timer, flight)
    yield CHECKPOINT
    return out.astype(F32), np.zeros(n_experts, dtype=np.int64)
