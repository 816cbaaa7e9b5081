"""The reference itself obeys SPEC §1's invariants (it is what every layout is held to)."""
import numpy as np

from spmd_moe.config import build_run_config
from spmd_moe.reference import reference_forward

MODEL = build_run_config("tiny", sets=["dtype=float32"]).model


def test_left_padding_does_not_change_real_outputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, MODEL.vocab_size, (2, 6))
    plain = reference_forward(MODEL, ids)
    padded_ids = np.concatenate([np.zeros((2, 3), int), ids], axis=1)
    mask = np.concatenate([np.zeros((2, 3), bool), np.ones((2, 6), bool)], axis=1)
    padded = reference_forward(MODEL, padded_ids, mask)
    assert np.allclose(padded["hidden"][:, 3:], plain["hidden"], atol=1e-10)
    assert np.all(padded["hidden"][:, :3] == 0)
    assert np.allclose(padded["logits"], plain["logits"], atol=1e-10)
    assert np.array_equal(padded["expert_counts"], plain["expert_counts"])


def test_causal_later_tokens_do_not_change_earlier_ones():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, MODEL.vocab_size, (1, 7))
    other = ids.copy()
    other[0, 5:] = (other[0, 5:] + 1) % MODEL.vocab_size
    a, b = reference_forward(MODEL, ids), reference_forward(MODEL, other)
    assert np.allclose(a["hidden"][:, :5], b["hidden"][:, :5], atol=1e-12)
    assert not np.allclose(a["hidden"][:, 5:], b["hidden"][:, 5:])


def test_every_real_token_is_routed_k_times():
    ids = np.random.default_rng(2).integers(0, MODEL.vocab_size, (3, 5))
    mask = np.ones((3, 5), bool)
    mask[0, :2] = False
    counts = reference_forward(MODEL, ids, mask)["expert_counts"]
    assert counts.shape == (MODEL.n_layers, MODEL.n_experts)
    assert (counts.sum(axis=1) == 13 * MODEL.top_k).all()


def test_storage_rounding_is_a_small_perturbation_in_float32():
    ids = np.random.default_rng(3).integers(0, MODEL.vocab_size, (2, 5))
    a = reference_forward(MODEL, ids, store=True)["hidden"]
    b = reference_forward(MODEL, ids, store=False)["hidden"]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-6
