"""The reference itself obeys SPEC §1's invariants (it is what every layout is held to)."""
import numpy as np
import pytest

from spmd_moe.core.config import build_run_config
from spmd_moe.model.reference import reference_forward

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


# --- the reference's weights are its own ------------------------------------------------

def test_the_reference_does_not_borrow_the_engines_weights():
    import ast
    import inspect

    from spmd_moe.model import reference

    tree = ast.parse(inspect.getsource(reference))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not imported & {"weights", "backend", "backend.array", "spmd_moe.model.weights",
                           "spmd_moe.backend.array"}, imported


def test_the_two_derivations_of_spec_weights_agree():
    # reference.spec_weight (the SPEC's table, written out) and weights.generate (what the
    # engine draws) give the same numbers for every family, in both dtypes.
    from spmd_moe.model.reference import spec_weight
    from spmd_moe.model.weights import WeightSource

    for dtype in ("float32", "bfloat16"):
        model = build_run_config("tiny", sets=[f"dtype={dtype}"]).model
        source = WeightSource(model, None, seed=3)
        for name in ("embed", "lm_head", "layers.2.wq", "layers.2.wk", "layers.2.wv",
                     "layers.2.wo", "layers.2.router", "layers.2.experts.7.w1",
                     "layers.2.experts.7.w2"):
            want = spec_weight(model, 3, name)
            assert np.array_equal(source.host(name).astype(np.float64), want), (dtype, name)


FAMILIES = ["embed", "layers.{l}.wq", "layers.{l}.wk", "layers.{l}.wv", "layers.{l}.wo",
            "layers.{l}.router", "layers.{l}.experts.{e}.w1", "layers.{l}.experts.{e}.w2",
            "lm_head"]


@pytest.mark.parametrize("family", FAMILIES + ["norms"])
def test_a_wrong_scale_in_the_engine_is_caught_by_the_reference(family, monkeypatch):
    """The mutant of the issue (wk at three times its SPEC scale in weights.py's table) and
    its siblings: each must make the engine disagree with the reference. The table is
    patched wherever it is used, as an edit of its source would be."""
    from mpi4py import MPI

    from spmd_moe.model import reference, weights
    from spmd_moe.model.inputs import synthetic_input
    from spmd_moe.engine.testing import check_against_reference, reference_for, run_layout

    if family == "norms":
        gain = weights.WeightSource.gain
        monkeypatch.setattr(weights.WeightSource, "gain",
                            lambda self, name, cols=None: gain(self, name, cols) * 3)
    else:
        table = weights.tensor_shapes

        def tripled(model):
            shapes = dict(table(model))
            shape, scale = shapes[family]
            shapes[family] = (shape, scale * 3)
            return shapes

        for module in (weights, reference):
            if hasattr(module, "tensor_shapes"):
                monkeypatch.setattr(module, "tensor_shapes", tripled)
    config = build_run_config("tiny", sets=["dtype=float32"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    outputs = run_layout(MPI.COMM_SELF, config, batch)
    with pytest.raises(AssertionError):
        check_against_reference(outputs, reference_for(config, batch), "float32")
