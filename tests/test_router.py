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


def deepseek_router64(logits, bias, top_k, n_group, topk_group, renormalize, scale):
    """transformers' DeepseekV3TopkRouter in float64, written out: sigmoid scores, choice on
    scores + bias within the best groups (a group's score: its two best), weights from the
    unbiased scores."""
    scores = 1 / (1 + np.exp(-logits))
    choice = scores + bias
    n, n_experts = choice.shape
    groups = choice.reshape(n, n_group, -1)
    group_scores = np.sort(groups, axis=-1)[..., -2:].sum(-1)
    kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
    mask = np.zeros((n, n_group), bool)
    np.put_along_axis(mask, kept, True, axis=1)
    choice = np.where(np.repeat(mask, n_experts // n_group, axis=1), choice, -np.inf)
    experts = np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(scores, experts, -1)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return experts, weights * scale


def test_sigmoid_router_selects_on_biased_scores_within_the_best_groups():
    """DeepSeek-V3: 16 experts in 4 groups, 2 kept, top-3; the bias moves the choice but
    not the weights; scaled by routed_scaling_factor."""
    from spmd_moe.moe.router import route_sigmoid

    rng = np.random.default_rng(1)
    b = rng.standard_normal((200, 16)).astype(np.float32)
    w = (rng.standard_normal((16, 16)) / 4).astype(np.float32)
    bias = (0.2 * rng.standard_normal(16)).astype(np.float32)
    logits = b.astype(np.float64) @ w
    for renormalize in (True, False):
        experts, weights = route_sigmoid(bk(), b, w, bias, 3, 4, 2, renormalize, 2.5)
        want_e, want_w = deepseek_router64(logits, bias, 3, 4, 2, renormalize, 2.5)
        assert experts.dtype == np.int32 and weights.dtype == np.float32
        assert np.array_equal(experts, want_e)
        assert np.allclose(weights, want_w, rtol=1e-5)
    # Every token's experts lie in two groups of four: the group limit holds.
    assert (np.array([len(set(row // 4)) for row in experts]) <= 2).all()
    # The bias decides selection: without it the choice differs for some tokens, while a
    # token's weights stay its unbiased scores.
    plain, _ = route_sigmoid(bk(), b, w, None, 3, 4, 2, True, 2.5)
    assert not np.array_equal(plain, experts)


def test_sigmoid_router_ties_go_to_the_lower_group_and_expert():
    from spmd_moe.moe.router import route_sigmoid

    b = np.zeros((1, 8), dtype=np.float32)         # every score 0.5: ties everywhere
    experts, weights = route_sigmoid(bk(), b, np.eye(8, dtype=np.float32), None, 3, 4, 2,
                                     True, 1.0)
    assert experts.tolist() == [[0, 1, 2]] and np.allclose(weights, 1 / 3)
