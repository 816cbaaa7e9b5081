"""The MoE half of a layer (moe/layer.py) at one rank, against the same arithmetic written
out token by token: route, each token's k experts, the weighted sum in float32; the same
function through either dispatcher (rows exchanged, or float32 partials allreduced), and
the steps it yields."""
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.backend.array import F32, Backend, BackendChoice
from spmd_moe.core.config import Layout, build_run_config
from spmd_moe.core.topology import Grid
from spmd_moe.model.weights import build_weights
from spmd_moe.moe.dispatcher import AllreduceDispatcher, AlltoallDispatcher
from spmd_moe.moe.experts import expert_ffn
from spmd_moe.moe.layer import moe_steps
from spmd_moe.moe.router import route
from spmd_moe.parallel.overlap import CHECKPOINT, Flight
from spmd_moe.parallel.transport import HostMpiTransport


def by_hand(bk, b, lw, model):
    experts, weights = route(bk, b, lw.router, model.top_k, model.router_renorm)
    moe = np.zeros(b.shape, dtype=F32)
    for t in range(b.shape[0]):
        for j in range(model.top_k):
            w1, w2, *w3 = lw.experts[int(experts[t, j])]
            out = expert_ffn(bk, b[t:t + 1], w1, w2, None, *w3)
            moe[t] += weights[t, j] * out[0].astype(F32)
    return moe, np.bincount(experts.ravel(), minlength=model.n_experts)


@pytest.mark.parametrize("kind", [AlltoallDispatcher, AllreduceDispatcher])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_moe_steps_compute_the_weighted_sum_of_each_token_s_experts(kind, activation):
    config = build_run_config("tiny", sets=["dtype=float32", "n_experts=4", "top_k=2",
                                            f"activation={activation}", "n_layers=1"])
    model = config.model
    bk = Backend(BackendChoice("numpy", "test"), "float32")
    lw = build_weights(Grid(Layout(), model, 0), bk, seed=3).layers[0]
    b = np.random.default_rng(3).standard_normal((9, model.d_model)).astype(np.float32)
    dispatcher = kind(bk, MPI.COMM_SELF, HostMpiTransport(bk), model.n_experts, model.top_k,
                      range(model.n_experts))
    timer = bk.timer()
    flight = Flight(timer)
    steps = moe_steps(dispatcher, b, lw, model, timer, flight)
    yielded, value = [], None
    while True:
        try:
            item = steps.send(value)
        except StopIteration as stop:
            moe, tokens_per_expert = stop.value
            break
        yielded.append("checkpoint" if item is CHECKPOINT else item.phase)
        value = None if item is CHECKPOINT else flight.wait(item)
    exchanges = (["count_exchange", "dispatch"] if kind is AlltoallDispatcher else [])
    assert yielded == ["checkpoint", *exchanges, "checkpoint", "combine"]
    want, counts = by_hand(bk, b, lw, model)
    assert moe.dtype == F32 and np.allclose(moe, want, rtol=1e-5, atol=1e-6)
    assert tokens_per_expert.tolist() == counts.tolist()
    assert timer.counters["expert_rows"] == 9 * model.top_k
