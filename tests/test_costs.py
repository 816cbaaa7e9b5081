"""FLOP, byte and memory arithmetic (spmd_moe/core/costs.py), checked against what the
engine allocates and computes rather than against itself."""
import numpy as np
import pytest

from spmd_moe.backend.array import Backend, BackendChoice
from spmd_moe.core.config import Layout, build_run_config
from spmd_moe.core.costs import (attention_core_flops, decode_step_bytes, kv_cache_bytes,
                                 layer_flops, parameter_counts, rank_cost)
from spmd_moe.core.topology import Grid
from spmd_moe.model.weights import build_weights


def array_bytes(tree) -> int:
    if isinstance(tree, np.ndarray):
        return tree.nbytes
    if isinstance(tree, dict):
        return sum(array_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(array_bytes(v) for v in tree)
    if hasattr(tree, "__dict__"):
        return sum(array_bytes(v) for v in vars(tree).values())
    return 0


@pytest.mark.parametrize("layout, rank", [("ep=2,pp=2", 0), ("ep=2,pp=2", 3), ("tp=2", 1),
                                          ("ep=4", 2)])
def test_weight_bytes_are_what_a_rank_builds(layout, rank):
    config = build_run_config("tiny", dtype="float32")
    parsed = Layout.parse(layout, 4)
    grid = Grid(parsed.validate(config.model, 4), config.model, rank)
    bk = Backend(BackendChoice("numpy", "test"), "float32")
    weights = build_weights(grid, bk, seed=0)
    cost = rank_cost(config, grid, np.full(5, 11), backend="numpy")
    assert cost.weight_bytes == array_bytes(weights)


def test_attention_core_flops_count_each_query_s_keys():
    # 3 queries with 1, 2, 3 keys; QK^T and PV: 2 * 2 * width multiply-adds per key.
    assert attention_core_flops(np.array([3]), width=8) == 2 * 8 * (1 + 2 + 3) * 2
    # A chunk of 2 queries after 5 earlier keys: 6 and 7 keys.
    assert attention_core_flops(np.array([2]), 8, starts=np.array([5])) == 2 * 8 * (6 + 7) * 2


def test_layer_flops_projections_router_and_experts():
    model = build_run_config("tiny").model                     # d=32, H=4, E=12, F=40
    flops = layer_flops(model, tokens=10, lengths=np.array([10]), heads=4, routed_rows=20,
                        ff_width=40)
    assert flops["attention_proj"] == 2 * 10 * 32 * (4 * 32)
    assert flops["router"] == 2 * 10 * 32 * 12
    assert flops["experts"] == 2 * 20 * 2 * 32 * 40


def test_parameter_counts_of_the_tiny_preset():
    model = build_run_config("tiny").model
    d, e, f, layers, vocab = 32, 12, 40, 5, 101
    per_layer = 4 * d * d + 2 * d + d * e
    total, active = parameter_counts(model)
    assert total == 2 * vocab * d + d + layers * (per_layer + e * 2 * d * f)
    assert active == 2 * vocab * d + d + layers * (per_layer + 2 * 2 * d * f)


def test_kv_cache_bytes_and_the_decode_floor():
    assert kv_cache_bytes(3, 2, 5, 4, 8, 2) == 2 * 3 * 2 * 5 * 4 * 8 * 2
    config = build_run_config("tiny", batch_size=4)
    grid = Grid(Layout.parse("ep=2", 2).validate(config.model, 2), config.model, 1)
    read = decode_step_bytes(config, grid, context=16)
    # Rank 1 holds sequences 2 and 3: their keys and values over 5 layers, bf16.
    assert read["kv_cache"] == 2 * 5 * 2 * 16 * 32 * 2
    assert read["expert_weights"] == 5 * 6 * 2 * 32 * 40 * 2 and "lm_head" in read
