"""``spmd-moe plan`` (spmd_moe/commands/plan.py) through its Python API: placement of every
rank, the fit check and its message, representatives of large worlds."""
import pytest

from spmd_moe.commands.plan import check_fit, format_plan, make_plan, plan_rows, print_plan
from spmd_moe.core.config import build_run_config
from spmd_moe.core.costs import GIB
from spmd_moe.core.errors import LayoutError


def test_every_rank_is_placed_and_costed():
    config = build_run_config("tiny")
    layout, costs = make_plan(config, 4, "ep=2,pp=2")
    assert [(c.rank, c.stage, c.group_rank) for c in costs] == [(0, 0, 0), (1, 0, 1),
                                                                 (2, 1, 0), (3, 1, 1)]
    # Five layers over two stages: the first stage takes the extra one.
    assert [len(c.layers) for c in costs] == [3, 3, 2, 2]
    assert [list(c.experts) for c in costs[:2]] == [list(range(6)), list(range(6, 12))]
    text = format_plan(config, layout, costs, 80 * GIB)
    assert "ep=2,pp=2" in text and all(f"{c.rank}" in text for c in costs)


def test_a_layout_that_cannot_work_is_refused_with_its_reason():
    with pytest.raises(LayoutError, match="ep"):
        make_plan(build_run_config("tiny"), 4, "ep=5")        # 12 experts over 5 ranks
    with pytest.raises(LayoutError, match="--world-size"):
        make_plan(build_run_config("tiny"), 0, None)


def test_the_fit_check_names_the_fullest_rank_and_the_numbers(capsys):
    config = build_run_config("paper")
    _, costs = make_plan(config, 16, "ep=16")
    worst = max(costs, key=lambda c: c.memory_bytes)
    check_fit(costs, worst.memory_bytes)                       # exactly fits
    with pytest.raises(LayoutError, match=f"rank {worst.rank} needs .* GiB"):
        check_fit(costs, worst.memory_bytes - 1)
    assert print_plan(config, 16, "ep=16", 1 * GIB) == 2
    assert "use more ranks or more stages" in capsys.readouterr().err


def test_large_worlds_show_one_rank_per_stage():
    config = build_run_config("paper")
    _, costs = make_plan(config, 256, "ep=16,pp=16")
    rows = plan_rows(costs)
    assert len(rows) == 16 and [r.stage for r in rows] == list(range(16))
    assert plan_rows(costs[:8]) == costs[:8]
