"""Experts: GELU (SPEC §1) and SwiGLU (SPEC §8's families) against float64 formulas."""
import math

import numpy as np

from spmd_moe.backend.array import Backend, BackendChoice
from spmd_moe.moe.experts import expert_ffn, run_experts, silu


def bk():
    return Backend(BackendChoice("numpy", "test"), "float32")


def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def test_silu_is_stable_and_exact():
    x = np.array([-1000.0, -30.0, -1.0, 0.0, 0.5, 40.0], dtype=np.float32)
    with np.errstate(over="raise"):
        got = silu(bk(), x)
    want = np.array([v / (1.0 + math.exp(-v)) if v > -700 else 0.0 for v in x.astype(float)])
    assert np.allclose(got, want, rtol=1e-6, atol=0)


def test_swiglu_expert_is_w2_of_silu_w1_times_w3():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 8)).astype(np.float32)
    w1, w3 = (rng.standard_normal((8, 5)).astype(np.float32) for _ in range(2))
    w2 = rng.standard_normal((5, 8)).astype(np.float32)
    gate, up = x.astype(np.float64) @ w1, x.astype(np.float64) @ w3
    want = (gate / (1 + np.exp(-gate)) * up) @ w2
    assert rel(expert_ffn(bk(), x, w1, w2, w3=w3), want) < 1e-6
    # run_experts passes each expert's third matrix on; two experts of 4 and 5 rows.
    out = run_experts(bk(), x, np.array([4, 5]), [(w1, w2, w3), (w1, w2, w3)])
    assert rel(out, want) < 1e-6
    gelu = run_experts(bk(), x, np.array([9]), [(w1, w2)])     # no w3: GELU
    assert not np.allclose(gelu, out)
