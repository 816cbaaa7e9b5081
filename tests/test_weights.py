"""Weights are SPEC §1's, whatever the layout: each rank draws exactly its own share."""
import zlib

import ml_dtypes
import numpy as np
import pytest

from spmd_moe.backend.array import Backend, BackendChoice
from spmd_moe.core.config import Layout, build_run_config
from spmd_moe.core.topology import Grid
from spmd_moe.model.weights import build_weights, generate


def spec_tensor(seed, name, shape, scale, dtype):
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, zlib.crc32(name.encode())])))
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)


def test_generate_is_the_spec_formula():
    got = generate("layers.2.experts.5.w1", (8, 12), 8 ** -0.5, "bfloat16", seed=7)
    want = spec_tensor(7, "layers.2.experts.5.w1", (8, 12), 8 ** -0.5, ml_dtypes.bfloat16)
    assert got.dtype == ml_dtypes.bfloat16
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert not np.array_equal(generate("layers.2.wq", (8, 8), 1.0, "float32", 0),
                              generate("layers.2.wk", (8, 8), 1.0, "float32", 0))


def numpy_backend(dtype="float32"):
    return Backend(BackendChoice("numpy", "test"), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_expert_parallel_rank_owns_its_experts_and_stage(dtype):
    config = build_run_config("tiny", sets=[f"dtype={dtype}", "n_layers=3"])
    layout = Layout(ep=2, tp=1, pp=2)
    bk = numpy_backend(dtype)
    first = build_weights(Grid(layout, config.model, 1), bk, seed=0)      # stage 0, e=1
    last = build_weights(Grid(layout, config.model, 2), bk, seed=0)       # stage 1, e=0
    assert sorted(first.layers) == [0, 1] and sorted(last.layers) == [2]
    assert sorted(first.layers[0].experts) == list(range(6, 12))
    assert sorted(last.layers[2].experts) == list(range(0, 6))
    assert first.embed is not None and first.lm_head is None
    assert last.embed is None and last.lm_head is not None
    w1 = generate("layers.0.experts.7.w1", (32, 40), 32 ** -0.5, dtype, 0)
    assert np.array_equal(first.layers[0].experts[7][0], w1.astype(np.float32))


def test_tensor_parallel_slices_match_the_full_tensors():
    config = build_run_config("tiny", sets=["dtype=float32"])
    layout = Layout(ep=1, tp=2, pp=1)
    bk = numpy_backend()
    d, f = config.model.d_model, config.model.d_ff
    full_q = generate("layers.1.wq", (d, d), d ** -0.5, "float32", 0)
    full_o = generate("layers.1.wo", (d, d), d ** -0.5, "float32", 0)
    full_w2 = generate("layers.1.experts.3.w2", (f, d), f ** -0.5, "float32", 0)
    for rank in range(2):
        weights = build_weights(Grid(layout, config.model, rank), bk, seed=0)
        cols = slice(rank * d // 2, (rank + 1) * d // 2)
        lw = weights.layers[1]
        assert np.array_equal(lw.wq, full_q[:, cols])
        assert np.array_equal(lw.wo, full_o[cols])
        assert sorted(lw.experts) == list(range(12))
        assert np.array_equal(lw.experts[3][1], full_w2[rank * f // 2:(rank + 1) * f // 2])
