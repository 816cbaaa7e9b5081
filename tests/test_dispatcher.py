"""The dispatchers (moe/dispatcher.py) at one rank: the steps each yields (one non-blocking
spelling: checkpoints and started exchanges), the plan built once the counts are known, the
rows' round trip, the TP baseline's allreduce and rounding, and the refusal of tokens whose
router logits were not finite. Several ranks: tests/mpi/ (layouts, the fake GPU suite)."""
import dataclasses

import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.backend.array import F32, Backend, BackendChoice
from spmd_moe.core.errors import NumericalFault
from spmd_moe.moe.dispatcher import (AllreduceDispatcher, AlltoallDispatcher, DispatchPlan,
                                     displacements_2d)
from spmd_moe.parallel.overlap import CHECKPOINT, Exchange, Flight
from spmd_moe.parallel.transport import HostMpiTransport

E, K, T, D = 4, 2, 7, 6


def backend(dtype="float32"):
    return Backend(BackendChoice("numpy", "test"), dtype)


def routed(seed=0):
    """T tokens' rows [T, d] and k distinct experts each (int32 [T, k])."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D)).astype(np.float32)
    top = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)
    return x, top


def drive(steps, flight):
    """Run a dispatcher generator to its end, recording what it yields."""
    yielded, value = [], None
    while True:
        try:
            item = steps.send(value)
        except StopIteration as stop:
            return stop.value, yielded
        yielded.append(CHECKPOINT if item is CHECKPOINT else item.phase)
        value = None if item is CHECKPOINT else flight.wait(item)


def test_alltoall_steps_plan_and_round_trip():
    bk = backend()
    dispatcher = AlltoallDispatcher(bk, MPI.COMM_SELF, HostMpiTransport(bk), E, K, range(E))
    x, top = routed()
    timer = bk.timer()
    flight = Flight(timer)
    (grouped, plan), yielded = drive(dispatcher.dispatch_steps(x, top, timer, flight), flight)
    assert yielded == [CHECKPOINT, "count_exchange", "dispatch"]
    per_expert = np.bincount(top.ravel(), minlength=E)
    assert plan.tokens_per_expert_host.tolist() == per_expert.tolist()
    assert plan.tokens_per_local_expert_host.tolist() == per_expert.tolist()
    assert plan.send_counts_host.tolist() == plan.recv_counts_host.tolist() == [T * K]
    assert plan.recv_by_expert_host.tolist() == [per_expert.tolist()]
    # Several local experts: rows regrouped by expert, the token rows of each in order.
    order = np.argsort(top.ravel(), kind="stable")
    assert np.array_equal(grouped, x[order // K])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.send_counts_host = None                       # built once, never patched
    weights = np.full((T, K), 1.0 / K, dtype=F32)
    moe, yielded = drive(dispatcher.combine_steps(grouped, plan, weights, timer, flight),
                         flight)
    assert yielded == ["combine"]
    assert np.allclose(moe, x)                             # every row came home, weighted
    assert set(timer.seconds) >= {"permute", "count_exchange", "dispatch", "combine",
                                  "unpermute"}
    assert all(isinstance(e, Exchange) for e in flight.finished) and not flight.pending


def test_one_local_expert_keeps_the_received_order():
    bk = backend()
    dispatcher = AlltoallDispatcher(bk, MPI.COMM_SELF, HostMpiTransport(bk), 1, 1, range(1))
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    timer = bk.timer()
    flight = Flight(timer)
    (grouped, plan), _ = drive(dispatcher.dispatch_steps(
        x, np.zeros((4, 1), np.int32), timer, flight), flight)
    assert plan.expert_order is None and np.array_equal(grouped, x)


def test_the_tp_baseline_moves_no_rows_and_sums_float32_partials():
    bk = backend("bfloat16")
    dispatcher = AllreduceDispatcher(bk, MPI.COMM_SELF, HostMpiTransport(bk), E, K, range(E))
    x, top = routed(1)
    x = bk.store(x)
    timer = bk.timer()
    flight = Flight(timer)
    (send, plan), yielded = drive(dispatcher.dispatch_steps(x, top, timer, flight), flight)
    assert yielded == [CHECKPOINT]                          # no exchange before the experts
    assert plan.send_counts_host is None and plan.recv_by_expert_host is None
    assert plan.tokens_per_local_expert_host.tolist() == plan.tokens_per_expert_host.tolist()
    partials = send.astype(F32) / 3                         # float32 partial outputs
    weights = np.full((T, K), 0.5, dtype=F32)
    moe, yielded = drive(dispatcher.combine_steps(partials, plan, weights, timer, flight),
                         flight)
    assert yielded == ["combine"] and moe.dtype == F32
    stored = bk.store(x.astype(F32) / 3).astype(F32)         # rounded once after the sum
    assert np.array_equal(moe, stored)


def test_tokens_with_non_finite_router_logits_are_refused_before_rows_move():
    bk = backend()
    transport = HostMpiTransport(bk)
    dispatcher = AlltoallDispatcher(bk, MPI.COMM_SELF, transport, E, K, range(E))
    x, top = routed(2)
    top[3] = E                                              # the router's sentinel
    timer = bk.timer()
    flight = Flight(timer)
    steps = dispatcher.dispatch_steps(x, top, timer, flight)
    assert next(steps) is CHECKPOINT                        # sorted and gathered in bounds
    with pytest.raises(NumericalFault, match=r"for 1 token\(s\) of rank 0"):
        steps.send(None)
    assert not flight.pending                               # the count exchange not started


def test_displacements_2d_is_source_major():
    counts = np.array([[1, 0, 2], [3, 1, 0]])
    assert displacements_2d(counts).tolist() == [[0, 1, 1], [3, 6, 7]]


def test_the_plan_s_fields_are_host_arrays_or_device_rows():
    names = [f.name for f in dataclasses.fields(DispatchPlan)]
    assert names[:3] == ["order", "tokens_per_expert_host", "tokens_per_local_expert_host"]
    assert all(f.default is None for f in dataclasses.fields(DispatchPlan)[3:])
