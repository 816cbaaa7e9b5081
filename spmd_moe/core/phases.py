"""The phases every run is timed in: one table, from which the report's order, the trace's
categories, the watchdog's waits, the pipeline's idle time and the performance model's
layer phases are all derived.

A phase is a ``kind`` of work (``compute``; ``comm``, an exchange within the stage;
``idle``, waiting for another stage or a barrier), happens once per ``layer`` or once per
stage pass or iteration, and may be one in which a rank ``waits`` for other ranks (the
watchdog marks those, --stall-timeout). Two finer marks: ``stage_idle`` phases are the
report's idle time of a stage (waiting for its input, draining its sends), and
``from_stage`` phases receive from another stage (pipeline waits, which the overlap does not
try to hide).
"""
from __future__ import annotations

from typing import NamedTuple


class Phase(NamedTuple):
    name: str
    kind: str                   # "compute" | "comm" | "idle"
    layer: bool = False         # once per layer (else once per pass or iteration)
    waits: bool = False         # a rank waits for others in it
    stage_idle: bool = False    # the report's pipeline idle time of a stage
    from_stage: bool = False    # a receive from another stage


# In the order reports list them (the layer loop's order inside a pass: SPEC §3).
TABLE = (
    Phase("embed", "compute"),
    Phase("stage_recv", "idle", waits=True, stage_idle=True, from_stage=True),
    Phase("attention", "compute", layer=True),
    Phase("attn_allreduce", "comm", layer=True, waits=True),
    Phase("router", "compute", layer=True),
    Phase("permute", "compute", layer=True),
    Phase("count_exchange", "comm", layer=True, waits=True),
    Phase("dispatch", "comm", layer=True, waits=True),
    Phase("experts", "compute", layer=True),
    Phase("combine", "comm", layer=True, waits=True),
    Phase("unpermute", "compute", layer=True),
    Phase("residual", "compute", layer=True),
    Phase("lm_head", "compute"),
    Phase("sample", "compute"),
    Phase("stage_send", "comm", waits=True),
    Phase("stage_drain", "idle", waits=True, stage_idle=True),
    Phase("token_return", "idle", waits=True, from_stage=True),
)
# The host's own spans in a trace (not an engine phase: never in a report's phase table).
BARRIER = Phase("barrier", "idle")

BY_NAME = {phase.name: phase for phase in TABLE + (BARRIER,)}
PHASES = tuple(phase.name for phase in TABLE)
WAIT_PHASES = frozenset(p.name for p in TABLE if p.waits)
STAGE_IDLE_PHASES = tuple(p.name for p in TABLE if p.stage_idle)
FROM_STAGE_PHASES = tuple(p.name for p in TABLE if p.from_stage)
LAYER_PHASES = tuple(p.name for p in TABLE if p.layer)
LAYER_COMPUTE_PHASES = tuple(p.name for p in TABLE if p.layer and p.kind == "compute")
LAYER_COMM_PHASES = tuple(p.name for p in TABLE if p.layer and p.kind == "comm")


def category(name: str) -> str:
    """A phase's kind (the trace's ``cat``); phases not in the table compute."""
    phase = BY_NAME.get(name)
    return phase.kind if phase is not None else "compute"
