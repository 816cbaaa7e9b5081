"""Chunked prefill on every layout family against the float64 reference, decode after it,
overlap on and off bitwise identical, and the report's schedule (SPEC §2's last bullet).

Run under ``mpiexec -n N python -m pytest --with-mpi tests/mpi`` for N = 2, 3, 4; at 8
ranks (bin/run-tests) only the pp=4 layouts run. Chunks of 1, 2, 3 and 5 tokens per rank
on a left-padded batch: chunks cross sequence boundaries, end sequences, and (counted in
padded positions) start inside the padding; N = 1 makes one micro-batch per token.
"""
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.commands.report import build_report
from spmd_moe.core.chunks import overlap_pays
from spmd_moe.core.config import Layout, build_run_config
from spmd_moe.core.errors import LayoutError
from spmd_moe.core.topology import Grid
from spmd_moe.engine.runner import open_session, run_decode, run_prefill
from spmd_moe.engine.testing import check_against_reference, reference_for
from spmd_moe.model.inputs import synthetic_input
from spmd_moe.model.reference import reference_generate

WORLD = MPI.COMM_WORLD
SIZE = WORLD.Get_size()
NEW_TOKENS = 3


def layouts(size: int) -> list[str]:
    """Expert-parallel and tensor-parallel layouts of tiny on ``size`` ranks (pp=4 only at
    8 ranks and more: the smaller ones run at 2-4)."""
    found = []
    for pp in range(1, size + 1):
        if size % pp or (size > 4 and pp != 4):
            continue
        group = size // pp
        for kind in ("ep", "tp"):
            if kind == "tp" and group == 1:
                continue
            text = f"{kind}={group},pp={pp}"
            try:
                Layout.parse(text, size).validate(build_run_config("tiny").model, size)
            except LayoutError:
                continue
            found.append(text)
    return found


def config_for(chunk: int, overlap: bool, dtype: str = "float32"):
    return build_run_config("tiny", sets=[f"dtype={dtype}", "pad_fraction=0.35", "batch_size=5",
                                          "seq_len=7", "workload=decode",
                                          f"new_tokens={NEW_TOKENS}", f"chunk_tokens={chunk}",
                                          f"overlap={'on' if overlap else 'off'}"])


def decode_run(config, batch, layout):
    session = open_session(config, WORLD, batch, layout=layout, backend="numpy",
                           new_tokens=NEW_TOKENS)
    try:
        result = run_decode(session, batch, NEW_TOKENS)
        count = result.schedule.count
        return result.outputs, (session.engine.overlaps(count), count)
    finally:
        session.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("layout", layouts(SIZE))
def test_chunked_prefill_then_decode_matches_the_reference(layout, chunk):
    """One decode run checks both: its output holds the prefill's hidden, logits and
    expert_counts, and the greedy tokens that continue from the chunk-filled KV cache. The
    same run without overlap gives the same bits."""
    config = config_for(chunk, overlap=True)
    batch = synthetic_input(config.workload, config.model, config.seed)
    overlapped, overlapping = decode_run(config, batch, layout)
    parsed = Layout.parse(layout, SIZE)
    alone, _ = decode_run(config_for(chunk, overlap=False), batch, layout)
    if WORLD.Get_rank() != 0:
        assert overlapped is None and alone is None
        return
    # Forced on: two micro-batches in flight wherever the stage has several ranks.
    assert overlapping[0] == (parsed.group > 1 and overlapping[1] >= 2)
    check_against_reference(overlapped, reference_for(config, batch), "float32")
    want = reference_generate(config.model, batch.ids, batch.mask, NEW_TOKENS, config.seed)
    assert np.array_equal(overlapped["tokens"], want)
    for key, value in overlapped.items():
        assert np.array_equal(value, alone[key]), key


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", layouts(SIZE))
def test_overlap_is_bitwise_identical_in_bfloat16(layout):
    outputs = []
    for overlap in (True, False):
        config = build_run_config("tiny", sets=["dtype=bfloat16", "batch_size=6", "seq_len=9",
                                                "chunk_tokens=4",
                                                f"overlap={'on' if overlap else 'off'}"])
        batch = synthetic_input(config.workload, config.model, config.seed)
        session = open_session(config, WORLD, batch, layout=layout, backend="numpy")
        outputs.append(run_prefill(session, batch).outputs)
        session.close()
    if WORLD.Get_rank() == 0:
        check_against_reference(outputs[0], reference_for(config, batch), "bfloat16")
        for key in outputs[0]:
            assert np.array_equal(outputs[0][key], outputs[1][key]), key


@pytest.mark.mpi(min_size=2)
def test_report_gives_the_schedule_idle_time_and_hidden_communication():
    layout = layouts(SIZE)[-1]                     # the most stages
    parsed = Layout.parse(layout, SIZE)
    reports = {}
    for name, sets in (("whole", ["micro_batches=1"]), ("chunks", ["chunk_tokens=2"])):
        config = build_run_config("tiny", sets=["dtype=float32", "batch_size=5", "seq_len=6",
                                                *sets])
        batch = synthetic_input(config.workload, config.model, config.seed)
        session = open_session(config, WORLD, batch, layout=layout, backend="numpy")
        reports[name] = build_report(session, batch, run_prefill(session, batch, iters=2))
        session.close()
    if WORLD.Get_rank() != 0:
        return
    whole, chunks = reports["whole"], reports["chunks"]
    most = max(len(Grid(parsed, config.model, r).sequences(5)) for r in range(SIZE)) * 6
    assert whole["pipeline"]["micro_batches"] == 1
    assert chunks["pipeline"]["micro_batches"] == -(-most // 2)
    assert chunks["pipeline"]["chunk_tokens"] == 2 and whole["pipeline"]["chunk_tokens"] is None
    for report in (whole, chunks):
        idle = report["pipeline"]["stage_idle"]
        assert [s["stage"] for s in idle] == list(range(parsed.pp))
        assert all(0 <= s["idle_fraction"] <= 1 and s["idle_ms"]["max"] >= 0 for s in idle)
        over = report["overlap"]
        assert over["hidden_ms"]["mean"] >= 0 and over["exposed_ms"]["mean"] > 0
    assert not whole["overlap"]["enabled"] and "one micro-batch" in whole["overlap"]["reason"]
    assert chunks["overlap"]["enabled"] == overlap_pays(chunks["pipeline"]["micro_batches"],
                                                        parsed.pp, parsed.group, "numpy")
    assert chunks["pipeline"]["bubble_fraction_ideal"] < whole["pipeline"][
        "bubble_fraction_ideal"] or parsed.pp == 1



@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", layouts(SIZE))
def test_every_wait_of_an_overlapped_run_is_one_the_watchdog_sees(layout, monkeypatch):
    """Each test and wait of a started exchange or send (overlap.Flight's pokes and
    wait_first, the pipeline's drain, the returned tokens) happens while the rank is marked
    waiting (phases.WAIT_PHASES or watchdog.waiting): a stalled peer is then named by the
    watchdog, with two micro-batches in flight too."""
    from spmd_moe.parallel import transport
    from spmd_moe.parallel.watchdog import Watchdog

    dog = Watchdog(None, 0)
    unseen = []

    def watched(cls, name):
        method = getattr(cls, name)

        def call(self, *args, **kwargs):
            phase, layer, waiting, _ = dog.where()
            if not waiting:
                unseen.append((cls.__name__, name, phase, layer))
            return method(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, call)

    for cls, name in ((transport.PendingExchange, "Test"), (transport.PendingExchange, "Wait"),
                      (transport.PendingSend, "Wait")):
        watched(cls, name)
    config = config_for(2, overlap=True)
    batch = synthetic_input(config.workload, config.model, config.seed)
    session = open_session(config, WORLD, batch, layout=layout, backend="numpy",
                           new_tokens=NEW_TOKENS, watchdog=dog)
    try:
        result = run_decode(session, batch, NEW_TOKENS)
        overlapped = session.engine.overlaps(result.schedule.count)
    finally:
        session.close()
    assert overlapped == (Layout.parse(layout, SIZE).group > 1)
    assert not unseen, sorted(set(unseen))
