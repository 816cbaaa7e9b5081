"""The engine on one rank against the float64 reference (layouts at several ranks:
tests/mpi/test_layouts.py)."""
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.commands.report import build_report
from spmd_moe.core.config import build_run_config
from spmd_moe.engine.runner import open_session, run_prefill
from spmd_moe.engine.testing import check_against_reference, reference_for, run_layout
from spmd_moe.model.inputs import synthetic_input, validate_batch
from spmd_moe.model.reference import reference_generate


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
    from spmd_moe.engine.runner import run_decode

    original = engine.new_cache
    engine.new_cache = lambda b, n: cache
    run_decode(session, batch, 4)
    engine.new_cache = original
    assert cache.lengths_host.tolist() == [2 + 3, 3 + 3]   # prompt + 3 decode steps cached
    assert {layer: id(a) for layer, a in cache.keys.items()} == arrays
    with pytest.raises(AssertionError, match="KV cache overflow"):
        from spmd_moe.model.blocks import pack

        engine.stage_pass(pack(session.backend, np.array([1]), np.array([2]), np.array([6])),
                          np.array([1, 2]), session.backend.timer(), cache,
                          np.zeros((5, 12), np.int64))
    session.close()


# --- chunked prefill -------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_chunked_prefill_and_decode_after_it_match_the_reference(chunk):
    """Left padding; chunks that cross sequence boundaries, end sequences, and (counted in
    padded positions) start inside the padding."""
    config = build_run_config("tiny", sets=["dtype=float32", "pad_fraction=0.4", "seq_len=9",
                                            f"chunk_tokens={chunk}", "workload=decode",
                                            "new_tokens=3"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    assert (chunk == 1 or (batch.lengths % chunk != 0).any()) and (~batch.mask).any()
    outputs = run_layout(MPI.COMM_SELF, config, batch)
    check_against_reference(outputs, reference_for(config, batch), "float32")
    assert np.all(outputs["hidden"][~batch.mask] == 0)
    decoded = run_layout(MPI.COMM_SELF, config, batch, decode_tokens=3)
    want = reference_generate(config.model, batch.ids, batch.mask, 3, config.seed)
    assert np.array_equal(decoded["tokens"], want)


def test_the_schedule_really_changes_and_overlap_changes_nothing():
    """Chunks give more micro-batches than whole sequences (the report says how many), and
    the results do not depend on the chunk size beyond rounding."""
    counts, outs = {}, {}
    for name, sets in (("whole", ["micro_batches=1"]), ("chunks", ["chunk_tokens=4"])):
        config = build_run_config("tiny", sets=["dtype=bfloat16", *sets])
        batch = synthetic_input(config.workload, config.model, config.seed)
        session = open_session(config, MPI.COMM_SELF, batch, backend="numpy")
        result = run_prefill(session, batch)
        counts[name] = build_report(session, batch, result)["pipeline"]["micro_batches"]
        outs[name] = result.outputs
        session.close()
    assert counts == {"whole": 1, "chunks": -(-batch.n_tokens // 4)}
    check_against_reference(outs["chunks"], outs["whole"], "bfloat16")


def memory_config(batch_size: int, schedule: str):
    return build_run_config("tiny", sets=["dtype=bfloat16", "d_model=128", "n_heads=4",
                                          "d_ff=256", "n_experts=4", "vocab_size=64",
                                          "n_layers=2", "max_seq_len=64", "seq_len=64",
                                          f"batch_size={batch_size}", schedule])


def measured_prefill(config):
    """(traced peak bytes of one prefill, the KV cache the engine allocated, rank_cost)."""
    import tracemalloc

    from spmd_moe.core.costs import rank_cost

    batch = synthetic_input(config.workload, config.model, config.seed)
    session = open_session(config, MPI.COMM_SELF, batch, backend="numpy")
    engine, caches = session.engine, []
    new_cache = engine.new_cache
    engine.new_cache = lambda b, n: caches.append(new_cache(b, n)) or caches[-1]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    engine.prefill(batch, session.backend.timer(), keep_hidden=False)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    cost = rank_cost(config, session.topo, batch.lengths, "numpy")
    session.close()
    allocated = sum(a.nbytes for c in caches for a in c.arrays())
    return peak, allocated, cost


def test_prefill_memory_is_bounded_by_the_chunk_not_the_batch():
    """The KV cache the engine allocates is exactly the memory check's; with chunks, the
    rest of a prefill's peak stays flat as the batch grows four-fold (whole sequences grow
    with it), and stays under the check's activation estimate."""
    chunked, whole = {}, {}
    for size in (8, 32):
        peak, kv, cost = measured_prefill(memory_config(size, "chunk_tokens=32"))
        assert kv == cost.kv_bytes > 0
        assert peak - kv <= cost.activation_bytes
        chunked[size] = peak - kv
        peak, kv, cost = measured_prefill(memory_config(size, "micro_batches=1"))
        assert kv == cost.kv_bytes == 0
        whole[size] = peak
    assert chunked[32] < 1.5 * chunked[8]
    assert whole[32] > 3 * whole[8] and whole[8] > 3 * chunked[8]


@pytest.mark.parametrize("path", ["numpy", "fake gpu"])
def test_non_finite_router_logits_stop_the_run_naming_the_layer(monkeypatch, path):
    """A NaN in a token's router input (SPMD_MOE_FAULT's ``nan``) makes its logits
    non-finite: the NumPy path and the GPU path (the fused router kernel's launch code on
    the fake device) both refuse the layer before any row moves, with the same line."""
    from fakes.engine import run_on_fake_gpu

    from spmd_moe.core.errors import NumericalFault

    monkeypatch.setenv("SPMD_MOE_FAULT", "0:2:nan")
    config = build_run_config("tiny", sets=["dtype=float32"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    with pytest.raises(NumericalFault) as fault:
        if path == "numpy":
            run_layout(MPI.COMM_SELF, config, batch)
        else:
            run_on_fake_gpu(monkeypatch, MPI.COMM_SELF, config, batch)
    assert str(fault.value) == ("layer 2: non-finite router logits (NaN, inf or no finite "
                                "value) for 1 token(s) of rank 0")
