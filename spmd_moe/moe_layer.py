"""The MoE half of a layer: route, dispatch, run the local experts, combine (SPEC §3).

Each phase is timed on its own (``timer.phase``) and the bytes each sends to other ranks are
counted, which is what the report's per-phase table shows.

Notation: T tokens on this rank, d width, E experts, k top-k.
"""
from __future__ import annotations

import numpy as np

from .backend import PhaseTimer
from .config import ModelConfig
from .dispatcher import Dispatcher
from .experts import run_experts
from .router import route
from .weights import LayerWeights


def moe_forward(dispatcher: Dispatcher, b, lw: LayerWeights, model: ModelConfig,
                timer: PhaseTimer):
    """b: [T, d] normalised hidden states (storage dtype) -> ``(moe float32 [T, d],
    tokens_per_expert int64 [E])``, the latter counting this rank's routed rows. ``model``
    says top-k and whether the router renormalises (the experts' matrices say their
    activation)."""
    bk = dispatcher.bk
    with timer.phase("router"):
        top_experts, weights = route(bk, b, lw.router, model.top_k,
                                     model.router_renorm)                  # [T, k] each
    with timer.phase("permute"):
        plan = dispatcher.dispatch_preprocess(top_experts)
        send = dispatcher.permute(b, plan)                                   # [R, d]
    with timer.phase("count_exchange"):
        timer.add_bytes("count_exchange", dispatcher.exchange_counts(plan))
    with timer.phase("dispatch"):
        received = dispatcher.token_dispatch(send, plan)                     # [Rr, d]
    timer.add_bytes("dispatch", dispatcher.dispatch_bytes(send, plan))
    with timer.phase("permute"):
        grouped = dispatcher.dispatch_postprocess(received, plan)
    with timer.phase("experts"):
        experts = [lw.experts[e] for e in dispatcher.local_experts]
        out = run_experts(bk, grouped, plan.tokens_per_local_expert_host, experts,
                          dispatcher.partial_dtype)
    timer.count("expert_rows", grouped.shape[0])
    with timer.phase("unpermute"):
        back = dispatcher.combine_preprocess(out, plan)
    with timer.phase("combine"):
        returned = dispatcher.token_combine(back, plan)                      # [R, d]
    timer.add_bytes("combine", dispatcher.combine_bytes(back, plan))
    with timer.phase("unpermute"):
        moe = dispatcher.combine_postprocess(returned, plan, weights)       # [T, d] f32
    return moe, plan.tokens_per_expert_host.astype(np.int64)
