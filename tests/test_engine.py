"""The engine on one rank against the float64 reference (layouts at several ranks:
tests/mpi/test_layouts.py)."""
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.config import build_run_config
from spmd_moe.data import synthetic_input, validate_batch
from spmd_moe.reference import reference_generate
from spmd_moe.runner import open_session, run_prefill
from spmd_moe.testing import check_against_reference, reference_for, run_layout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sets", [[], ["pad_fraction=0.4", "batch_size=7", "seq_len=13"]])
def test_one_rank_matches_reference(dtype, sets):
    config = build_run_config("tiny", sets=[f"dtype={dtype}", *sets])
    batch = synthetic_input(config.workload, config.model, config.seed)
    outputs = run_layout(MPI.COMM_SELF, config, batch)
    check_against_reference(outputs, reference_for(config, batch), dtype)
    assert np.all(outputs["hidden"][~batch.mask] == 0)


def test_several_experts_per_rank_and_micro_batches():
    config = build_run_config("tiny", sets=["dtype=float32", "micro_batches=3", "top_k=3",
                                            "seed=4"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    outputs = run_layout(MPI.COMM_SELF, config, batch)
    check_against_reference(outputs, reference_for(config, batch), "float32")


def test_repeated_iterations_give_identical_outputs():
    config = build_run_config("tiny", sets=["dtype=bfloat16"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    session = open_session(config, MPI.COMM_SELF, batch, backend="numpy")
    first = run_prefill(session, batch).outputs
    again = run_prefill(session, batch, warmup=1, iters=2)
    session.close()
    assert len(again.timings) == 2
    assert np.array_equal(first["hidden"], again.outputs["hidden"])
    assert all(t.phases["experts"] > 0 and t.wall > 0 for t in again.timings)


@pytest.mark.parametrize("eos", [None, "auto"])
def test_decode_equals_full_forward_on_the_growing_sequence(eos):
    config = build_run_config("tiny", sets=["dtype=float32", "pad_fraction=0.3",
                                            "workload=decode", "new_tokens=5"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    want = reference_generate(config.model, batch.ids, batch.mask, 5, config.seed)
    eos_id = None
    if eos == "auto":
        eos_id = int(want[0, 1])   # sequence 0 stops after its second token
        want = reference_generate(config.model, batch.ids, batch.mask, 5, config.seed, eos_id)
        assert (want[0, 2:] == -1).all()
    outputs = run_layout(MPI.COMM_SELF, config, batch, decode_tokens=5, eos_id=eos_id)
    assert np.array_equal(outputs["tokens"], want)
    assert outputs["tokens"].shape == (batch.batch_size, 5)


def test_kv_cache_never_grows_past_its_preallocation():
    config = build_run_config("tiny", sets=["dtype=float32", "workload=decode",
                                            "new_tokens=4"])
    batch = validate_batch(np.array([[0, 5, 6], [1, 2, 3]]), np.array([[0, 1, 1], [1, 1, 1]]),
                           config.model, new_tokens=4)
    session = open_session(config, MPI.COMM_SELF, batch, backend="numpy", new_tokens=4)
    engine = session.engine
    cache = engine.new_cache(batch, 4)
    arrays = {layer: id(a) for layer, a in cache.keys.items()}
    assert cache.capacity == 3 + 4
    from spmd_moe.runner import run_decode

    original = engine.new_cache
    engine.new_cache = lambda b, n: cache
    run_decode(session, batch, 4)
    engine.new_cache = original
    assert cache.lengths_host.tolist() == [2 + 3, 3 + 3]   # prompt + 3 decode steps cached
    assert {layer: id(a) for layer, a in cache.keys.items()} == arrays
    with pytest.raises(AssertionError, match="KV cache overflow"):
        from spmd_moe.model import pack

        engine.stage_pass(pack(session.backend, np.array([1]), np.array([2]), np.array([6])),
                          np.array([1, 2]), session.backend.timer(), cache,
                          np.zeros((5, 12), np.int64))
    session.close()
