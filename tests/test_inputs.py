"""Input checks at the edge: every bad input names its field."""
import errno
import os
import stat

import numpy as np
import pytest

from spmd_moe.core.config import PRESETS, build_run_config
from spmd_moe.core.errors import ConfigError, InputError, OutputError
from spmd_moe.core.files import check_output_paths, text_writer, write_files, write_npz
from spmd_moe.engine.testing import broken_inputs
from spmd_moe.model.inputs import InputFile, load_input, synthetic_input, validate_batch

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
    with pytest.raises(InputError, match="--input: cannot read .*: No such file"):
        load_input(str(tmp_path / "absent.npz"), MODEL)


def test_every_broken_input_file_is_one_line_with_its_reason(tmp_path):
    for name, (path, reason) in broken_inputs(tmp_path, MODEL.vocab_size).items():
        with pytest.raises(InputError) as info:
            load_input(str(path), MODEL)
        assert reason in str(info.value), (name, str(info.value))
        assert "\n" not in str(info.value)


def test_input_headers_are_read_before_any_data(tmp_path):
    # 128 MiB of ids that deflate to ~130 KiB: the shape is known without reading them.
    import tracemalloc

    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, ids=np.zeros((4096, 4096), dtype=np.int64))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        source = InputFile(str(path))
        assert source.shape == (4096, 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        source.close()
    assert peak < 1 << 20


def test_a_member_shorter_than_its_header_says_is_truncated(tmp_path):
    import zipfile

    header = tmp_path / "h.npy"
    np.save(header, np.zeros((1000, 1000), dtype=np.int64))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.writestr("ids.npy", header.read_bytes()[:4096])
    with pytest.raises(InputError, match="is truncated: ids.npy declares \\(1000, 1000\\) "
                                         "int64"):
        InputFile(str(tmp_path / "short.npz"))


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


# --- output paths ----------------------------------------------------------------------

def test_output_paths_that_are_not_files_are_refused(tmp_path):
    target = tmp_path / "precious.npz"
    target.write_bytes(b"keep")
    (tmp_path / "link.npz").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.npz")
    (tmp_path / "dir.npz").mkdir()
    for name, kind in (("link.npz", "a symbolic link"), ("fifo.npz", "a FIFO"),
                       ("dir.npz", "a directory")):
        with pytest.raises(ConfigError, match=f"^--output: .*{name} is {kind};"):
            check_output_paths((str(tmp_path / name), "--output"))
    with pytest.raises(ConfigError, match="^--report: /dev/null is a character device"):
        check_output_paths((None, "--output"), ("/dev/null", "--report"))
    with pytest.raises(ConfigError, match="^--output: the path is empty"):
        check_output_paths(("", "--output"))
    check_output_paths((str(target), "--output"), (str(tmp_path / "new.json"), "--report"))
    assert target.read_bytes() == b"keep"


def test_the_same_file_twice_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "sub")
    same = [(str(tmp_path / "x"), str(tmp_path / "x")),
            (str(tmp_path / "sub" / "x"), str(tmp_path / "alias" / "x")),   # via a link
            (str(tmp_path / "x"), str(tmp_path / "sub" / ".." / "x"))]
    (tmp_path / "a").write_bytes(b"")
    os.link(tmp_path / "a", tmp_path / "b")                                 # a hard link
    same.append((str(tmp_path / "a"), str(tmp_path / "b")))
    for output, report in same:
        with pytest.raises(ConfigError, match="^--report: .* is the same file as --output"):
            check_output_paths((output, "--output"), (report, "--report"))


def test_output_files_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_npz(str(tmp_path / "out.npz"), a=np.arange(3))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out.npz").st_mode) == 0o640


def test_a_full_disk_leaves_no_file_behind(tmp_path):
    def fills_the_disk(out):
        out.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    old = tmp_path / "out.npz"
    old.write_bytes(b"previous run")
    files = [(str(tmp_path / "report.json"), "--report", text_writer("{}")),
             (str(old), "--output", fills_the_disk)]
    with pytest.raises(OutputError, match="^--output: cannot write .*out.npz: No space left "
                                          "on device$"):
        write_files(files)
    # Neither file is written (the report was complete, but not renamed into place) and
    # the old output is untouched: all or nothing.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]
    assert old.read_bytes() == b"previous run"
