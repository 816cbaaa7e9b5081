"""The MoE half of a layer: route, dispatch, run the local experts, combine (SPEC §3); and
the families' additions to it (SPEC §8): a shared expert on every token, and dense layers.

Each phase is timed on its own (``timer.phase``) and the bytes each sends to other ranks are
counted, which is what the report's per-phase table shows. :func:`moe_steps` is a step of a
stage pass (overlap.py): it yields the dispatch and the combine when it has started them and
goes on with their results, so that another micro-batch can compute meanwhile.

A shared expert (``ModelConfig.d_shared``) needs no exchange: under expert parallelism it
runs on the token's own rank while the dispatch is in flight; under TP each rank holds its F
slice and its float32 partial rides in the combine's allreduce with the routed rows'. Its
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
from .dispatcher import Dispatcher
from .experts import expert_ffn, run_experts, sigmoid
from .router import route_for


def moe_steps(dispatcher: Dispatcher, b, lw: LayerWeights, model: ModelConfig,
              timer: PhaseTimer, flight: Flight):
    """b: [T, d] normalised hidden states (storage dtype) -> ``(moe float32 [T, d],
    tokens_per_expert int64 [E])``, the latter counting this rank's routed rows. ``model``
    says top-k and whether the router renormalises (the experts' matrices say their
    activation). A generator: yields the started count exchange and dispatch (expert
    parallel only) and combine, and checkpoints between compute phases (overlap.py)."""
    bk = dispatcher.bk
    with timer.phase("router"):
        top_experts, weights = route_for(bk, b, lw, model)                  # [T, k] each
    with timer.phase("permute"):
        plan = dispatcher.dispatch_preprocess(top_experts)
        send = dispatcher.permute(b, plan)                                   # [R, d]
    yield CHECKPOINT
    received = send
    if dispatcher.exchanges_rows:
        counts = yield flight.start("count_exchange", lambda: dispatcher.start_counts(plan),
                                    dispatcher.count_bytes(plan))            # [P, El]
        dispatcher.finish_counts(plan, counts)
        started = flight.start("dispatch", lambda: dispatcher.start_dispatch(send, plan),
                               dispatcher.dispatch_bytes(send, plan))
        shared = _shared(dispatcher, b, lw, timer)          # while the dispatch moves
        received = yield started                                            # [Rr, d]
    else:
        dispatcher.exchange_counts(plan)    # the TP baseline exchanges none
        shared = _shared(dispatcher, b, lw, timer)          # [T, d] float32 partial
    with timer.phase("permute"):
        grouped = dispatcher.dispatch_postprocess(received, plan)
    with timer.phase("experts"):
        experts = [lw.experts[e] for e in dispatcher.local_experts]
        out = run_experts(bk, grouped, plan.tokens_per_local_expert_host, experts,
                          dispatcher.partial_dtype)
    timer.count("expert_rows", grouped.shape[0])
    yield CHECKPOINT
    with timer.phase("unpermute"):
        back = dispatcher.combine_preprocess(out, plan)
        if shared is not None and not dispatcher.exchanges_rows:
            back = bk.xp.concatenate([back, shared])        # one allreduce for both
    returned = yield flight.start("combine", lambda: dispatcher.start_combine(back, plan),
                                  dispatcher.combine_bytes(back, plan))
    with timer.phase("combine"):
        returned = dispatcher.finish_combine(returned)                       # [R, d]
        if shared is not None and not dispatcher.exchanges_rows:
            returned, shared = returned[:out.shape[0]], returned[out.shape[0]:]
    with timer.phase("unpermute"):
        moe = dispatcher.combine_postprocess(returned, plan, weights)       # [T, d] f32
        if shared is not None:
            moe += _gated(bk, b, lw, shared)
    return moe, plan.tokens_per_expert_host.astype(np.int64)


def _shared(dispatcher: Dispatcher, b, lw: LayerWeights, timer: PhaseTimer):
    """The layer's shared expert on b [T, d]: [T, d] in the storage dtype, or the float32
    partial of this rank's F slice under TP; None without one."""
    if lw.shared is None:
        return None
    with timer.phase("experts"):
        w1, w2, w3 = lw.shared
        return expert_ffn(dispatcher.bk, b, w1, w2, dispatcher.partial_dtype, w3=w3)


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
    if not dispatcher.exchanges_rows:
        out = yield flight.start("combine", lambda: dispatcher.start_combine(out, None),
                                 dispatcher.combine_bytes(out, None))
        with timer.phase("combine"):
            out = dispatcher.finish_combine(out)
    yield CHECKPOINT
    return out.astype(F32), np.zeros(n_experts, dtype=np.int64)
