"""Input checks at the edge: every bad input names its field."""
import numpy as np
import pytest

from spmd_moe.config import PRESETS, build_run_config
from spmd_moe.data import load_input, synthetic_input, validate_batch, write_npz
from spmd_moe.errors import InputError

MODEL = PRESETS["tiny"].model


def test_a_good_batch_with_left_padding():
    ids = np.array([[-1, -1, 4, 5], [1, 2, 3, 4]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    batch = validate_batch(ids, mask, MODEL)
    assert batch.lengths.tolist() == [2, 4]
    assert batch.real_ids(np.array([0, 1])).tolist() == [4, 5, 1, 2, 3, 4]
    assert batch.mask.dtype == bool


@pytest.mark.parametrize("ids, mask, match", [
    (np.arange(5), None, "ids: must be a 2-D"),
    (np.ones((2, 3)) * 0.5, None, "ids: must be integers"),
    (np.ones((2, 3), int), np.ones((2, 4), int), "mask: shape \\(2, 4\\) must equal"),
    (np.ones((2, 3), int), np.full((2, 3), 2), "mask: values must be 0"),
    (np.ones((2, 3), int), np.ones((2, 3)) * 1.0, "mask: must be bool or 0/1 integers"),
    (np.ones((2, 3), int), np.array([[1, 1, 1], [0, 0, 0]]), "sequence 1 has no real token"),
    (np.ones((2, 3), int), np.array([[1, 1, 0], [1, 1, 1]]), "sequence 0 is not left-padded"),
    (np.array([[1, 2, 101]]), None, "token id 101 is outside \\[0, vocab_size=101\\)"),
    (np.array([[1, -3, 2]]), None, "token id -3 is outside"),
    (np.ones((1, 65), int), None, "sequence 0 has 65 real tokens = 65, more than max_seq_len=64"),
])
def test_bad_inputs_name_the_field(ids, mask, match):
    with pytest.raises(InputError, match=match):
        validate_batch(ids, mask, MODEL)


def test_prompt_plus_new_tokens_must_fit():
    with pytest.raises(InputError, match="60 real tokens \\+ new_tokens 5 = 65"):
        validate_batch(np.ones((1, 60), int), None, MODEL, new_tokens=5)


def test_padding_ids_are_ignored():
    batch = validate_batch(np.array([[999, 3]]), np.array([[0, 1]]), MODEL)
    assert batch.n_tokens == 1


def test_load_input_file(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, ids=np.array([[1, 2], [3, 4]]), mask=np.array([[0, 1], [1, 1]], bool))
    assert load_input(str(path), MODEL).lengths.tolist() == [1, 2]
    np.savez(tmp_path / "noids.npz", tokens=np.ones((1, 2)))
    with pytest.raises(InputError, match="has no 'ids' array \\(found: tokens\\)"):
        load_input(str(tmp_path / "noids.npz"), MODEL)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(InputError, match="--input: cannot read"):
        load_input(str(tmp_path / "junk.npz"), MODEL)
    with pytest.raises(InputError, match="--input: cannot read"):
        load_input(str(tmp_path / "absent.npz"), MODEL)


def test_synthetic_input_is_spec_and_padded_on_the_left():
    config = build_run_config("tiny", sets=["pad_fraction=0.4", "batch_size=64"])
    batch = synthetic_input(config.workload, config.model, seed=3)
    again = synthetic_input(config.workload, config.model, seed=3)
    assert np.array_equal(batch.ids, again.ids) and np.array_equal(batch.mask, again.mask)
    assert batch.mask[:, -1].all()
    assert (np.diff(batch.mask.astype(int), axis=1) >= 0).all()
    fraction = 1 - batch.mask.mean()
    assert 0.2 < fraction < 0.6
    plain = synthetic_input(build_run_config("tiny").workload, config.model, seed=0)
    assert plain.mask.all()


def test_write_npz_is_atomic(tmp_path):
    path = tmp_path / "out.npz"
    write_npz(str(path), a=np.arange(3))
    assert np.load(path)["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]
