"""The MoE half of a layer: route, dispatch, run the local experts, combine (SPEC §3).

Each phase is timed on its own (``timer.phase``) and the bytes each sends to other ranks are
counted, which is what the report's per-phase table shows. :func:`moe_steps` is a step of a
stage pass (overlap.py): it yields the dispatch and the combine when it has started them and
goes on with their results, so that another micro-batch can compute meanwhile.

Notation: T tokens on this rank, d width, E experts, k top-k.
"""
from __future__ import annotations

import numpy as np

from ..backend.array import PhaseTimer
from ..core.config import ModelConfig
from ..model.weights import LayerWeights
from ..parallel.overlap import CHECKPOINT, Flight
from .dispatcher import Dispatcher
from .experts import run_experts
from .router import route


def moe_steps(dispatcher: Dispatcher, b, lw: LayerWeights, model: ModelConfig,
              timer: PhaseTimer, flight: Flight):
    """b: [T, d] normalised hidden states (storage dtype) -> ``(moe float32 [T, d],
    tokens_per_expert int64 [E])``, the latter counting this rank's routed rows. ``model``
    says top-k and whether the router renormalises (the experts' matrices say their
    activation). A generator: yields the started count exchange and dispatch (expert
    parallel only) and combine, and checkpoints between compute phases (overlap.py)."""
    bk = dispatcher.bk
    with timer.phase("router"):
        top_experts, weights = route(bk, b, lw.router, model.top_k,
                                     model.router_renorm)                  # [T, k] each
    with timer.phase("permute"):
        plan = dispatcher.dispatch_preprocess(top_experts)
        send = dispatcher.permute(b, plan)                                   # [R, d]
    yield CHECKPOINT
    received = send
    if dispatcher.exchanges_rows:
        counts = yield flight.start("count_exchange", lambda: dispatcher.start_counts(plan),
                                    dispatcher.count_bytes(plan))            # [P, El]
        dispatcher.finish_counts(plan, counts)
        received = yield flight.start("dispatch", lambda: dispatcher.start_dispatch(send, plan),
                                      dispatcher.dispatch_bytes(send, plan))  # [Rr, d]
    else:
        dispatcher.exchange_counts(plan)    # the TP baseline exchanges none
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
    returned = yield flight.start("combine", lambda: dispatcher.start_combine(back, plan),
                                  dispatcher.combine_bytes(back, plan))
    with timer.phase("combine"):
        returned = dispatcher.finish_combine(returned)                       # [R, d]
    with timer.phase("unpermute"):
        moe = dispatcher.combine_postprocess(returned, plan, weights)       # [T, d] f32
    return moe, plan.tokens_per_expert_host.astype(np.int64)
