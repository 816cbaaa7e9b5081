"""The engine's GPU path on the asynchronous fake device (tests/fakes/), at 2 and 4 ranks,
against the NumPy path: expert parallel, expert parallel x pipeline with chunked prefill
and two micro-batches in flight, the tensor-parallel baseline (its allreduces overlapped
too), each followed by decode steps, over each device transport (``mpi-cuda``, ``mpi-host``,
``nccl``), in three interleavings (each seed a different order of the streams' work on
each rank, and of the passes in flight).

The fake runs work only when something waits, reuses freed memory while queued work still
uses it, and checks every buffer handed to MPI against the work still queued: a missing
synchronisation gives wrong numbers or a DeviceHazard; NCCL calls queued in orders the
ranks cannot match give a DeviceDeadlock. ``mpiexec -n N python -m pytest --with-mpi
tests/mpi/test_fake_gpu.py`` for N = 2, 4 (other sizes skip).
"""
import numpy as np
import pytest
from fakes.engine import DEVICE_TRANSPORTS, run_on_fake_gpu
from mpi4py import MPI

from spmd_moe.core.config import build_run_config
from spmd_moe.engine.testing import relative_error, run_layout
from spmd_moe.model.inputs import synthetic_input

WORLD = MPI.COMM_WORLD
SIZE = WORLD.Get_size()
NEW_TOKENS = 3
SEEDS = (1, 2, 3)
BASE = ["dtype=float32", "pad_fraction=0.35", "batch_size=5", "seq_len=7",
        "workload=decode", f"new_tokens={NEW_TOKENS}"]

# name -> (layout at 2 ranks, layout at 4 ranks, settings)
CASES = {
    "ep": ("ep=2", "ep=4", []),
    "ep_pp_chunked_overlap": ("ep=2", "ep=2,pp=2", ["chunk_tokens=3", "overlap=on"]),
    "tp_chunked_overlap": ("tp=2", "tp=2,pp=2", ["chunk_tokens=4", "overlap=on"]),
}
_numpy: dict = {}

sizes = pytest.mark.skipif(SIZE not in (2, 4), reason="the fake-device suite runs at 2 and 4 "
                                                       "ranks")


def case(name: str):
    two, four, sets = CASES[name]
    config = build_run_config("tiny", sets=BASE + sets)
    return config, synthetic_input(config.workload, config.model, config.seed), \
        (two if SIZE == 2 else four)


def numpy_path(name: str) -> dict | None:
    """The case on the NumPy backend (rank 0's outputs), once per module."""
    if name not in _numpy:
        config, batch, layout = case(name)
        _numpy[name] = run_layout(WORLD, config, batch, layout, NEW_TOKENS)
    return _numpy[name]


@sizes
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("transport", DEVICE_TRANSPORTS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_path_on_the_fake_device_matches_numpy(monkeypatch, name, transport, seed):
    want = numpy_path(name)
    config, batch, layout = case(name)
    got, device = run_on_fake_gpu(monkeypatch, WORLD, config, batch, layout, transport,
                                  decode_tokens=NEW_TOKENS, seed=seed)
    # The fake did its job: work was deferred and MPI buffers were checked.
    assert device.executed > 0 and (device.hazards_checked > 0 or transport == "nccl")
    if WORLD.Get_rank() != 0:
        assert got is None
        return
    for key in ("hidden", "logits"):
        assert relative_error(got[key], want[key]) < 1e-5, key
    assert np.array_equal(got["expert_counts"], want["expert_counts"])
    assert np.array_equal(got["tokens"], want["tokens"])
