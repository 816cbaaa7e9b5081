"""Every layout computes SPEC §1's function: outputs on rank 0 against the float64 reference.

Run under ``mpiexec -n N python -m pytest --with-mpi tests/mpi`` for N = 2, 3, 4 (and the
8- and 16-rank runs of bin/run-tests). Layouts are those that fit the world size: expert
parallel with pp stages, and the tensor-parallel baseline.
"""
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.core.config import Layout, build_run_config
from spmd_moe.core.errors import LayoutError
from spmd_moe.engine.testing import check_against_reference, reference_for, run_layout
from spmd_moe.model.inputs import synthetic_input
from spmd_moe.model.reference import reference_generate

WORLD = MPI.COMM_WORLD
SIZE = WORLD.Get_size()

# tiny: L=5 lets pp be 2..5 with layers not divisible by pp; E=12, H=4, F=40.
BASE: list[str] = []


def layouts(size: int) -> list[str]:
    """Expert-parallel and tensor-parallel layouts of tiny on ``size`` ranks."""
    found = []
    for pp in range(1, size + 1):
        if size % pp:
            continue
        group = size // pp
        for kind in ("ep", "tp"):
            if kind == "tp" and group == 1:
                continue
            text = f"{kind}={group},pp={pp}"
            config = build_run_config("tiny", sets=BASE)
            try:
                Layout.parse(text, size).validate(config.model, size)
            except LayoutError:
                continue
            found.append(text)
    return found


CASES = {
    # Left padding, 5 sequences over the ranks (uneven), micro-batches that do not divide.
    "padded": ["pad_fraction=0.35", "batch_size=5", "seq_len=11", "micro_batches=3"],
    # One 2-token sequence: most ranks hold no sequence, most experts get no row, and some
    # rank receives no row at all (asserted below, so the case cannot quietly vanish).
    "sparse": ["batch_size=1", "seq_len=2", "seed=1"],
    # Several sequences per rank, top-3, a different seed.
    "dense": ["batch_size=9", "seq_len=6", "top_k=3", "seed=5"],
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", layouts(SIZE))
def test_layout_matches_reference(layout, case, dtype):
    config = build_run_config("tiny", sets=BASE + CASES[case] + [f"dtype={dtype}"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    outputs = run_layout(WORLD, config, batch, layout=layout)
    if WORLD.Get_rank() != 0:
        assert outputs is None
        return
    reference = reference_for(config, batch)
    check_against_reference(outputs, reference, dtype)
    if case == "sparse" and dtype == "float32":
        parsed = Layout.parse(layout, SIZE)
        counts = reference["expert_counts"]
        assert (counts == 0).any()
        if parsed.ep > 1:
            per_rank = counts.reshape(config.model.n_layers, parsed.ep, -1).sum(axis=2)
            assert (per_rank == 0).any(), "no rank went without rows: case lost its point"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", layouts(SIZE))
def test_decode_matches_growing_full_forward(layout):
    config = build_run_config("tiny", sets=BASE + ["dtype=float32", "pad_fraction=0.3",
                                                   "batch_size=5", "seq_len=7",
                                                   "workload=decode", "new_tokens=4"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    eos_id = None
    want = None
    if WORLD.Get_rank() == 0:
        want = reference_generate(config.model, batch.ids, batch.mask, 4, config.seed)
        eos_id = int(want[2, 0])        # sequence 2 stops at once, others may too
        want = reference_generate(config.model, batch.ids, batch.mask, 4, config.seed, eos_id)
    eos_id = WORLD.bcast(eos_id, root=0)
    outputs = run_layout(WORLD, config, batch, layout=layout, decode_tokens=4, eos_id=eos_id)
    if WORLD.Get_rank() == 0:
        assert np.array_equal(outputs["tokens"], want), (outputs["tokens"], want)
        assert (outputs["tokens"][2, 1:] == -1).all()


@pytest.mark.mpi(min_size=4)
def test_tensor_parallel_with_experts_not_divisible_by_tp():
    # The baseline splits heads and F, never experts: E=6 over tp=4 is a valid layout.
    config = build_run_config("tiny", sets=["dtype=float32", "n_experts=6"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    outputs = run_layout(WORLD, config, batch, layout=f"tp=4,pp={SIZE // 4}")
    if WORLD.Get_rank() == 0:
        check_against_reference(outputs, reference_for(config, batch), "float32")


def one_expert_layouts(size: int) -> list[str]:
    """Expert-parallel layouts of ``size`` ranks with ep >= 2 and pp <= tiny's 5 layers;
    run with n_experts = ep, each rank owns exactly one expert of each of its layers."""
    return [f"ep={size // pp},pp={pp}" for pp in range(1, 6)
            if size % pp == 0 and size // pp >= 2]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", one_expert_layouts(SIZE))
def test_one_expert_per_rank_matches_reference(layout, dtype):
    # The paper's deployment (E = ep): the dispatcher's regrouping by local expert is a
    # no-op there, a branch no other layout takes.
    ep = Layout.parse(layout, SIZE).ep
    config = build_run_config("tiny", sets=[f"dtype={dtype}", f"n_experts={ep}",
                                            f"top_k={min(2, ep)}", "pad_fraction=0.3",
                                            "batch_size=7", "seq_len=9"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    outputs = run_layout(WORLD, config, batch, layout=layout)
    if WORLD.Get_rank() == 0:
        check_against_reference(outputs, reference_for(config, batch), dtype)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", [l for l in layouts(SIZE) if Layout.parse(l, SIZE).pp > 1])
def test_micro_batches_change_the_schedule_not_the_result(layout):
    """--micro-batches M, or chunks (--chunk-tokens, or the default): the report counts the
    stage passes the engine ran (M, or the chunk schedule's count: not the config's), gives
    each stage's idle time (none for the first), and the outputs stay the reference's."""
    from spmd_moe.commands.report import build_report
    from spmd_moe.engine.runner import open_session, run_prefill
    from spmd_moe.engine.testing import relative_error

    pp = Layout.parse(layout, SIZE).pp
    outputs = {}
    for micro in (1, 3, "chunk_tokens=2", "default"):
        setting = [f"micro_batches={micro}"] if isinstance(micro, int) else (
            [] if micro == "default" else [micro])
        config = build_run_config("tiny", sets=["dtype=float32", "pad_fraction=0.3",
                                                "batch_size=5", "seq_len=9", *setting])
        batch = synthetic_input(config.workload, config.model, config.seed)
        session = open_session(config, WORLD, batch, layout=layout, backend="numpy")
        result = run_prefill(session, batch)
        report = build_report(session, batch, result)
        session.close()
        if WORLD.Get_rank() == 0:
            pipeline = report["pipeline"]
            want = micro if isinstance(micro, int) else result.schedule.count
            assert pipeline["micro_batches"] == want, pipeline
            if micro == "chunk_tokens=2":
                assert want > 3, pipeline
            idle = pipeline["stage_recv_ms_by_stage"]
            assert len(idle) == pp and idle[0] == 0 and all(ms > 0 for ms in idle[1:]), idle
            check_against_reference(result.outputs, reference_for(config, batch), "float32")
            outputs[micro] = result.outputs
    if WORLD.Get_rank() == 0:
        for micro in (3, "chunk_tokens=2", "default"):
            assert relative_error(outputs[micro]["logits"], outputs[1]["logits"]) < 1e-6
            assert np.array_equal(outputs[micro]["expert_counts"], outputs[1]["expert_counts"])
