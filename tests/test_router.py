"""Top-k routing: the k largest probabilities, ties to the lower expert index."""
import numpy as np

from spmd_moe.backend.array import Backend, BackendChoice
from spmd_moe.moe.router import route


def bk():
    return Backend(BackendChoice("numpy", "test"), "float32")


def test_ties_go_to_the_lower_expert_index():
    # Identity router: logits are the rows of b themselves.
    b = np.array([[1.0, 3.0, 3.0, 3.0],     # a three-way tie for first
                  [2.0, 2.0, 0.0, 0.0],     # a tie for first and second
                  [0.0, 0.0, 0.0, 0.0],     # all equal
                  [0.0, 1.0, 5.0, 1.0]], dtype=np.float32)
    experts, weights = route(bk(), b, np.eye(4, dtype=np.float32), top_k=2)
    assert experts.tolist() == [[1, 2], [0, 1], [0, 1], [2, 1]]
    assert np.allclose(weights[:3], 0.5)
    assert np.allclose(weights.sum(-1), 1.0)


def test_weights_are_the_renormalised_softmax():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((50, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    experts, weights = route(bk(), b, w, top_k=3)
    logits = b.astype(np.float64) @ w
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")[:, :3]
    assert np.array_equal(experts, order)
    top = np.take_along_axis(p, order, -1)
    assert np.allclose(weights, top / top.sum(-1, keepdims=True), rtol=1e-5)
    assert experts.dtype == np.int32 and weights.dtype == np.float32
    # OLMoE (and Qwen3-MoE without norm_topk_prob): the top-k probabilities as they are.
    same, raw = route(bk(), b, w, top_k=3, renormalize=False)
    assert np.array_equal(same, experts) and np.allclose(raw, top, rtol=1e-5)
