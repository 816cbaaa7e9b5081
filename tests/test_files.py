"""The read and write doors (core/files.py): what every file the program opens by a user's
or a checkpoint's name must be, and how outputs appear whole or not at all."""
import errno
import json
import os

import pytest

from spmd_moe.core import files
from spmd_moe.core.errors import ConfigError, InputError, OutputError, one_line
from spmd_moe.core.files import (MAX_JSON_DEPTH, READ_LIMITS, JsonFields, check_output_paths,
                                 open_regular, read_json, read_text, write_directory)

CAPPED = sorted(kind for kind, limit in READ_LIMITS.items() if limit.max_bytes is not None)


# --- reading -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(READ_LIMITS))
def test_only_a_regular_file_is_read_and_a_fifo_never_blocks(tmp_path, kind):
    os.mkfifo(tmp_path / "fifo")           # no writer: a blocking open would wait forever
    for path, what in ((tmp_path / "fifo", "a FIFO"), ("/dev/zero", "a character device"),
                       (tmp_path, "a directory")):
        with pytest.raises(InputError, match=f"^f: {path} is {what}, not a regular file$"):
            open_regular(str(path), "f", kind)
    with pytest.raises(InputError, match="^f: '' is not a file name"):
        open_regular("", "f", kind)


@pytest.mark.parametrize("kind", CAPPED)
def test_each_kind_of_file_has_its_cap(tmp_path, kind):
    cap = READ_LIMITS[kind].max_bytes
    path = tmp_path / "big"
    with open(path, "wb") as handle:
        handle.truncate(cap + 1)           # sparse: nothing is written, nothing is read
    with pytest.raises(InputError, match=f"is {cap + 1} bytes; .* may have at most {cap}$"):
        read_text(str(path), "f", kind)
    with open(path, "r+b") as handle:
        handle.truncate(cap)
    assert len(read_text(str(path), "f", kind)) == cap


def test_text_must_be_utf8(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(InputError, match=r"latin1.json is not UTF-8 text \(byte 13: b'\\xe9'\)"):
        read_json(str(tmp_path / "latin1.json"), "f")


@pytest.mark.parametrize("text, message", [
    ("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, None),
    ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "nests deeper than 32 levels"),
    ('{"a": ' * 40 + "1" + "}" * 40, "nests deeper than 32 levels"),
    ("[" * 100000, "nests deeper than 32 levels"),
    ('{"a": 1, "a": 2}', "has the key 'a' twice in one object"),
    ('{"x": {"b": [1, {"c": 1, "c": 1}]}}', "has the key 'c' twice"),
    ('{"a": NaN}', "is not valid JSON: NaN is not a JSON number"),
    ('{"a": -Infinity}', "is not valid JSON: -Infinity is not a JSON number"),
    ('{"a": 1e400}', "is not valid JSON: number 1e400 is out of range"),
    ('{"a": ' + "9" * 5000 + "}", "is not valid JSON"),
])
def test_json_depth_keys_and_numbers_are_bounded(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_text(text)
    if message is None:
        read_json(str(path), "f")
        return
    with pytest.raises(InputError, match="^f: .*x.json " + message):
        read_json(str(path), "f")


def test_reports_may_hold_nan_as_our_own_writer_does(tmp_path):
    (tmp_path / "r.json").write_text('{"mfu": NaN}')
    assert read_json(str(tmp_path / "r.json"), "REPORT", "report")["mfu"] != 0


def test_a_file_of_a_directory_stays_inside_it_once_links_are_resolved(tmp_path):
    model, outside = tmp_path / "model", tmp_path / "outside"
    model.mkdir()
    outside.mkdir()
    os.mkfifo(outside / "trap")             # opened at all, it would block
    (model / "a.json").write_text("{}")
    (model / "inner.json").symlink_to("a.json")
    (model / "escape.json").symlink_to(outside / "trap")
    assert read_json(str(model / "inner.json"), "f", inside=str(model)) == {}
    with pytest.raises(InputError, match="escape.json resolves to .*trap, outside .*model$"):
        read_json(str(model / "escape.json"), "f", inside=str(model))
    # A Hugging Face hub cache: snapshots/<rev>/f -> ../../blobs/<hash> is inside.
    snapshot = tmp_path / "repo" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "repo" / "blobs").mkdir()
    (tmp_path / "repo" / "blobs" / "123").write_text("[1]")
    (snapshot / "config.json").symlink_to("../../blobs/123")
    assert read_json(str(snapshot / "config.json"), "f", inside=str(snapshot)) == [1]


def test_fields_are_type_checked_as_they_are_taken():
    fields = JsonFields({"n": 3, "b": True, "f": 1.5, "s": "x", "l": [1, 2], "o": {"k": "v"},
                         "z": None}, "config.json", "/m/config.json")
    assert fields.get("n", "integer") == 3 and fields.get("f", "number") == 1.5
    assert fields.get("l", "integer|integers") == [1, 2]
    assert fields.get("z", "integer", 7) == 7 and fields.get("absent", "string", "d") == "d"
    assert fields.fields("o").get("k", "string") == "v"
    for key, kind, message in (
            ("b", "integer", "config.json b: True must be an integer (/m/config.json)"),
            ("s", "number", "config.json s: 'x' must be a finite number"),
            ("f", "integer|integers", "config.json f: 1.5 must be an integer or an array of "
                                      "integers"),
            ("n", "strings", "config.json n: 3 must be an array of strings"),
            ("absent", "integer", "config.json absent: missing (/m/config.json)")):
        with pytest.raises(InputError) as info:
            fields.get(key, kind)
        assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(InputError, match="^config.json o.k: 'v' must be an integer"):
        fields.fields("o").get("k", "integer")
    with pytest.raises(ConfigError, match="^REPORT: must be a JSON object, not an array"):
        JsonFields([], "REPORT", error=ConfigError)


def test_error_lines_escape_what_could_forge_another_line():
    line = str(ConfigError("dtype", "'x\nspmd-moe: error: forged'\r\x1b[2K\u2028\ud800 é"))
    assert line == "dtype: 'x\\nspmd-moe: error: forged'\\r\\x1b[2K\\u2028\\ud800 é"
    assert len(line.splitlines()) == 1 and one_line("plain text") == "plain text"


# --- writing -----------------------------------------------------------------------------

def test_an_output_is_never_an_input(tmp_path):
    source = tmp_path / "in.npz"
    source.write_bytes(b"x")
    (tmp_path / "alias").symlink_to(tmp_path)
    os.link(source, tmp_path / "hard.npz")
    for output in (source, tmp_path / "alias" / "in.npz", tmp_path / "hard.npz"):
        with pytest.raises(ConfigError, match="^--output: .* is the input --input .*in.npz: an "
                                              "output never replaces an input$"):
            check_output_paths((str(output), "--output"), inputs=((str(source), "--input"),))
    check_output_paths((str(tmp_path / "out.npz"), "--output"),
                       inputs=((str(source), "--input"), (str(tmp_path / "gone"), "--config")))


def fill_two(directory):
    for name in ("a", "b"):
        (open(os.path.join(directory, name), "w")).write(name)
    return ["a", "b"]


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    assert write_directory(str(target), "export", fill_two) == ["a", "b"]
    assert sorted(os.listdir(target)) == ["a", "b"]
    (tmp_path / "empty").mkdir()                       # an empty directory is replaced
    write_directory(str(tmp_path / "empty"), "export", fill_two)
    assert sorted(os.listdir(tmp_path / "empty")) == ["a", "b"]

    def full_disk(directory):
        fill_two(directory)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def interrupted(directory):
        fill_two(directory)
        raise KeyboardInterrupt

    for fill, error in ((full_disk, OutputError), (interrupted, KeyboardInterrupt)):
        with pytest.raises(error) as info:
            write_directory(str(tmp_path / "new"), "export", fill)
        if error is OutputError:
            assert str(info.value) == (f"export: cannot write {tmp_path / 'new'}: No space "
                                       "left on device")
        assert sorted(os.listdir(tmp_path)) == ["empty", "model"]    # no temporary left
    assert not files._STAGED


@pytest.mark.parametrize("make, message", [
    (lambda p: p.symlink_to("elsewhere"), "is a symbolic link"),
    (lambda p: p.write_text("x"), "is a file; give a new path or an empty directory"),
    (lambda p: (p.mkdir(), (p / "f").write_text("x")), "exists and is not an empty directory"),
])
def test_a_directory_output_is_new_or_empty(tmp_path, make, message):
    target = tmp_path / "out"
    make(target)
    with pytest.raises(ConfigError, match=f"^export: .*out {message}"):
        write_directory(str(target), "export", fill_two)
    with pytest.raises(ConfigError, match="^export: the path is empty"):
        write_directory("", "export", fill_two)


def test_the_free_disk_is_checked_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_disk_bytes", lambda path: 1000)
    with pytest.raises(OutputError, match="needs 0.00 GB but its filesystem has 0.00 GB free"):
        write_directory(str(tmp_path / "m"), "export", fill_two, need_bytes=1001)
    assert os.listdir(tmp_path) == []


def test_discarding_staged_temporaries(tmp_path):
    """What the watchdog does before it aborts the job on a signal."""
    staged = []

    def fill(directory):
        staged.append(directory)
        files.discard_staged()
        assert not os.path.exists(directory)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_directory(str(tmp_path / "m"), "export", fill)
    assert staged and os.listdir(tmp_path) == []
    assert json.dumps(sorted(files._STAGED)) == "[]"
