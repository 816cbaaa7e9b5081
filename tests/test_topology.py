"""Grid arithmetic for grouped-query attention under TP: which K/V heads a rank holds."""
import pytest

from spmd_moe.core.config import Layout, ModelConfig
from spmd_moe.core.errors import LayoutError
from spmd_moe.core.topology import Grid

MODEL = ModelConfig(vocab_size=10, d_model=48, n_heads=12, n_layers=2, n_experts=4, d_ff=24,
                    n_kv_heads=4)


def kv_of(tp: int) -> list[range]:
    layout = Layout(tp=tp).validate(MODEL, tp)
    return [Grid(layout, MODEL, rank).kv_heads for rank in range(tp)]


def test_expert_parallel_ranks_hold_every_kv_head():
    assert Grid(Layout(ep=2), MODEL, 1).kv_heads == range(4)


def test_tp_dividing_kv_heads_splits_them():
    assert kv_of(2) == [range(0, 2), range(2, 4)]          # heads 0-5 use kv 0-1, ...
    assert kv_of(4) == [range(i, i + 1) for i in range(4)]


def test_tp_a_multiple_of_kv_heads_replicates_each():
    # tp=12: each rank one query head; query head h uses kv head h // 3.
    assert kv_of(12) == [range(h // 3, h // 3 + 1) for h in range(12)]


def test_other_tp_is_refused_naming_both():
    with pytest.raises(LayoutError, match="tp=6 must divide n_kv_heads=4 or be a multiple"):
        Layout(tp=6).validate(MODEL, 6)
