"""The MoE half of a layer: route, dispatch, run the local experts, combine (SPEC §3).

Each phase is timed on its own (``timer.phase``) and the bytes each sends to other ranks are
counted, which is what the report's per-phase table shows. :func:`moe_steps` is a step of a
stage pass (overlap.py): it yields the exchanges the dispatcher starts (the count exchange,
dispatch and combine, or the TP allreduce) and goes on with their results, so that another
micro-batch can compute meanwhile. One code path for every layout: the dispatcher decides
what moves.

Notation: T tokens on this rank, d width, E experts, k top-k.
"""
from __future__ import annotations

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
    activation). A generator (overlap.py): the dispatcher's steps yield each exchange they
    start (dispatcher.py), and a checkpoint sits between the experts and the combine."""
    bk = dispatcher.bk
    with timer.phase("router"):
        top_experts, weights = route(bk, b, lw.router, model.top_k,
                                     model.router_renorm)                  # [T, k] each
    grouped, plan = yield from dispatcher.dispatch_steps(b, top_experts, timer, flight)
    with timer.phase("experts"):
        experts = [lw.experts[e] for e in dispatcher.local_experts]
        out = run_experts(bk, grouped, plan.tokens_per_local_expert_host, experts,
                          dispatcher.partial_dtype)                        # [Rr, d]
    timer.count("expert_rows", grouped.shape[0])
    yield CHECKPOINT
    moe = yield from dispatcher.combine_steps(out, plan, weights, timer, flight)  # [T, d]
    return moe, plan.tokens_per_expert_host
