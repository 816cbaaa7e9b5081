"""The one table of phases (spmd_moe/core/phases.py) and the pass cursor (core/trace.py)."""
from __future__ import annotations

import ast
from pathlib import Path

import spmd_moe
from spmd_moe.core import phases
from spmd_moe.core.trace import PassCursor, SpanContext

PACKAGE = Path(spmd_moe.__file__).parent
# What the bench times besides the engine's phases (its layer step runs the engine's layer):
# the whole step, and the attention core alone (SPEC §7 compares it with PyTorch's SDPA).
BENCH_SPANS = {"step", "attention_core"}


def phase_names_used() -> dict[str, str]:
    """Every literal phase name given to ``timer.phase(...)`` or ``flight.start(...)`` in the
    library, with where."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("phase", "start") and node.args
                    and _receiver(node.func.value) in ("timer", "flight")
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found[node.args[0].value] = f"{path.relative_to(PACKAGE)}:{node.lineno}"
    return found


def _receiver(node) -> str | None:
    """``timer`` for ``timer.phase`` and ``self.timer.phase``; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None


def test_every_phase_the_engine_times_is_in_the_table():
    used = phase_names_used()
    assert {"attention", "dispatch", "combine", "stage_recv", "token_return"} <= set(used)
    unknown = {name: where for name, where in used.items()
               if name not in phases.BY_NAME and name not in BENCH_SPANS}
    assert not unknown, unknown
    bench = {name: where for name, where in used.items() if name in BENCH_SPANS}
    assert all(where.startswith("perf/") for where in bench.values()), bench


def test_the_derived_sets():
    assert phases.PHASES[0] == "embed" and "barrier" not in phases.PHASES
    assert phases.LAYER_PHASES == ("attention", "attn_allreduce", "router", "permute",
                                   "count_exchange", "dispatch", "experts", "combine",
                                   "unpermute", "residual")
    assert set(phases.LAYER_COMM_PHASES) == {"attn_allreduce", "count_exchange", "dispatch",
                                              "combine"}
    assert set(phases.LAYER_COMPUTE_PHASES) | set(phases.LAYER_COMM_PHASES) == \
        set(phases.LAYER_PHASES)
    # Every exchange within the stage and every wait for another stage is a watched wait.
    assert {p.name for p in phases.TABLE if p.kind != "compute"} == phases.WAIT_PHASES
    assert set(phases.STAGE_IDLE_PHASES) == {"stage_recv", "stage_drain"}
    assert set(phases.FROM_STAGE_PHASES) == {"stage_recv", "token_return"}
    assert phases.category("barrier") == "idle" and phases.category("stage_send") == "comm"
    assert phases.category("attention") == "compute" and phases.category("new") == "compute"


def test_the_cursor_tells_its_listeners_the_layer():
    cursor, layers = PassCursor(), []
    cursor.listen(layers.append)
    cursor.at_layer(3)                          # outside a pass: micro-batch unknown
    assert cursor.context == SpanContext(-1, -1, 3, 0)
    cursor.start_pass(5, 17)
    assert cursor.context == SpanContext(5, 1, -1, 17)
    cursor.at_layer(2)
    saved = cursor.context
    cursor.leave_layers()
    assert cursor.context == SpanContext(5, 1, -1, 17)
    cursor.place(saved)                         # overlap.run_passes swapping passes back
    cursor.end()
    assert cursor.context is None
    assert layers == [3, -1, 2, -1, 2]
