"""Every file the program reads or writes by a user's name or a checkpoint's name goes
through this module: one door for reading, one for writing (docs/RELIABILITY.md).

Reading (:func:`open_regular`, :func:`read_text`, :func:`read_json`): a regular file (a
FIFO, device or directory is refused without blocking), symlinks resolved and then checked
to stay inside the directory the file belongs to (``inside``), at most the size of its kind
(:data:`READ_LIMITS`), valid UTF-8, JSON of bounded depth with finite numbers; then
:class:`JsonFields` type-checks every field as it is taken. Failures raise the caller's
error class (InputError by default) naming the field, one line.

Writing:

- :func:`check_output_path` / :func:`check_output_paths`: an output is absent or a regular
  file in a writable directory; never a link, directory, FIFO or device; never the same
  path twice, never one of the command's inputs (SPEC §6). Raise ConfigError naming the
  option.
- :func:`write_files`: each file written to a temporary sibling and renamed into place,
  all or none, honouring the umask; a full disk leaves no partial file.
- :func:`write_directory`: a directory (``export``) written as a temporary sibling and
  renamed into place when complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import numpy as np

from .errors import ConfigError, InputError, OutputError, SpmdMoeError

MIB = 1 << 20


def file_kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


# --- reading: one door -------------------------------------------------------------------

@dataclass(frozen=True)
class ReadLimit:
    """What a kind of file is (for messages) and the most bytes of it the program reads
    (None: no cap, its content is sized by its own headers before anything big is read)."""

    what: str
    max_bytes: int | None
    json_constants: bool = False   # NaN / Infinity accepted (our own reports may hold them)


READ_LIMITS: dict[str, ReadLimit] = {
    # --config, config.json, generation_config.json, --cluster: a few kB in practice.
    "config": ReadLimit("a JSON config", 1 * MIB),
    # model.safetensors.index.json: ~100 bytes per tensor (DeepSeek-V3's 92k tensors: 9 MB).
    "index": ReadLimit("a safetensors index", 64 * MIB),
    # tokenizer.json: 2-35 MB for published vocabularies of 32k-260k tokens.
    "tokenizer": ReadLimit("a tokenizer.json", 64 * MIB),
    "prompts": ReadLimit("a prompts file", 64 * MIB),
    # plot's REPORT (a report or a --trace), plan --against, --calibration.
    "report": ReadLimit("a spmd-moe report or trace", 256 * MIB, json_constants=True),
    # Safetensors files: the header is capped by what the model needs (checkpoint.py), the
    # data is memory-mapped and read slice by slice.
    "weights": ReadLimit("a safetensors file", None),
    # --input .npz: its arrays are sized by their .npy headers before they are read.
    "input": ReadLimit("an .npz file", None),
}
MAX_JSON_DEPTH = 32      # reports nest 5 deep, tokenizer.json 6; a JSON bomb nests 100,000


def plain_name(name: Any) -> bool:
    """Whether ``name`` is a plain file name: a non-empty string with no separator, no
    ``.``/``..``, no control character."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and all(ord(c) >= 32 and c != "\x7f" for c in name))


def resolves_inside(directory: str, path: str) -> bool:
    """Whether ``path``, symlinks resolved, is a file of ``directory``.

    The one allowance is the Hugging Face hub cache, where a snapshot's files are links
    into the same repository's blob store (``<repo>/snapshots/<rev>/f -> ../../blobs/<h>``):
    for a directory ``<repo>/snapshots/<rev>``, a file of ``<repo>/blobs`` counts as inside."""
    target = os.path.dirname(os.path.realpath(path))
    root = os.path.realpath(directory)
    if target == root:
        return True
    snapshots = os.path.dirname(root)
    return (os.path.basename(snapshots) == "snapshots"
            and target == os.path.join(os.path.dirname(snapshots), "blobs"))


def open_regular(path: str, field: str, kind: str, inside: str | None = None,
                 error: type[SpmdMoeError] = InputError) -> BinaryIO:
    """``path`` opened for reading, after the door's checks: a non-empty name; with
    ``inside``, symlinks resolved, a file of that directory (:func:`resolves_inside`);
    opened without blocking (a FIFO with no writer, a tape) and then, by the descriptor, a
    regular file of at most ``READ_LIMITS[kind].max_bytes``. The file checked is the file
    read: the resolved path is opened with O_NOFOLLOW. Raises ``error(field, ...)``."""
    limit = READ_LIMITS[kind]
    if not isinstance(path, str) or not path or "\0" in path:
        raise error(field, f"{path!r} is not a file name")
    resolved = os.path.realpath(path)
    if inside is not None and not resolves_inside(inside, resolved):
        raise error(field, f"{path} resolves to {resolved}, outside {inside}")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(resolved, flags)
    except OSError as exc:
        raise error(field, f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        other = file_kind(info.st_mode)
        if other is not None:
            raise error(field, f"{path} is {other}, not a regular file")
        if limit.max_bytes is not None and info.st_size > limit.max_bytes:
            raise error(field, f"{path} is {info.st_size} bytes; {limit.what} may have at "
                               f"most {limit.max_bytes}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str, field: str, kind: str, inside: str | None = None,
               error: type[SpmdMoeError] = InputError) -> bytes:
    """The content of ``path`` through :func:`open_regular` (a file that grows past its
    cap while read is refused too)."""
    limit = READ_LIMITS[kind].max_bytes
    with open_regular(path, field, kind, inside, error) as handle:
        try:
            raw = handle.read() if limit is None else handle.read(limit + 1)
        except OSError as exc:
            raise error(field, f"cannot read {path}: {exc.strerror}") from None
    if limit is not None and len(raw) > limit:
        raise error(field, f"{path} grew past {limit} bytes while read")
    return raw


def decode_utf8(raw: bytes, path: str, field: str,
                error: type[SpmdMoeError] = InputError) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(field, f"{path} is not UTF-8 text (byte {exc.start}: "
                           f"{raw[exc.start:exc.start + 1]!r})") from None


def read_text(path: str, field: str, kind: str, inside: str | None = None,
              error: type[SpmdMoeError] = InputError) -> str:
    """:func:`read_bytes`, as valid UTF-8 text."""
    return decode_utf8(read_bytes(path, field, kind, inside, error), path, field, error)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """An object whose keys are all different (json keeps the last of two silently: a
    config or a header with a key twice means two things at once)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return data


def json_depth_within(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests at most ``limit`` arrays and objects deep (walked without
    recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        for child in (item.values() if isinstance(item, dict) else item):
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return False
                stack.append((child, depth + 1))
    return True


def parse_json(text: str, path: str, field: str, kind: str = "config",
               error: type[SpmdMoeError] = InputError) -> Any:
    """``text`` (the content of ``path``) as JSON: at most :data:`MAX_JSON_DEPTH` deep, no
    key twice in an object, numbers finite (NaN and Infinity only where the kind allows
    them)."""
    options = {} if READ_LIMITS[kind].json_constants else dict(
        parse_float=_finite, parse_constant=_no_constant)
    deep = f"{path} nests deeper than {MAX_JSON_DEPTH} levels"
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, **options)
    except RecursionError:
        raise error(field, deep) from None
    except _DuplicateKey as exc:
        raise error(field, f"{path} has the key {exc.args[0]!r} twice in one object") from None
    except ValueError as exc:            # JSONDecodeError, an int of 5000 digits, NaN
        raise error(field, f"{path} is not valid JSON: {exc}") from None
    if not json_depth_within(value):
        raise error(field, deep)
    return value


def read_json(path: str, field: str, kind: str = "config", inside: str | None = None,
              error: type[SpmdMoeError] = InputError) -> Any:
    """The JSON document in ``path``, through the door (:func:`read_text`,
    :func:`parse_json`)."""
    return parse_json(read_text(path, field, kind, inside, error), path, field, kind, error)


def json_type(value: Any) -> str:
    """A JSON value's type, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def shown(value: Any, width: int = 60) -> str:
    """``repr(value)``, shortened for a one-line message."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 4] + " ..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


# kind -> (test, what it must be): the types JsonFields takes.
JSON_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "integer": (_is_int, "an integer"),
    "number": (_is_number, "a finite number"),
    "boolean": (lambda v: isinstance(v, bool), "true or false"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "array": (lambda v: isinstance(v, list), "an array"),
    "integers": (lambda v: isinstance(v, list) and all(map(_is_int, v)),
                 "an array of integers"),
    "numbers": (lambda v: isinstance(v, list) and all(map(_is_number, v)),
                "an array of finite numbers"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                "an array of strings"),
    "numbers_or_nulls": (lambda v: isinstance(v, list) and all(
        x is None or _is_number(x) for x in v), "an array of finite numbers or nulls"),
}
REQUIRED = object()


def check_json(value: Any, kind: str, field: str, where: str = "",
               error: type[SpmdMoeError] = InputError) -> Any:
    """``value`` if it is of ``kind`` (a :data:`JSON_KINDS` key, or several joined by
    ``|``), else ``error(field, ...)``; ``where`` (a path) is named in the message."""
    kinds = kind.split("|")
    if any(JSON_KINDS[k][0](value) for k in kinds):
        return value
    wanted = " or ".join(JSON_KINDS[k][1] for k in kinds)
    raise error(field, f"{shown(value)} must be {wanted}" + (f" ({where})" if where else ""))


class JsonFields:
    """A JSON object read through the door; each field is type-checked as it is taken.

    ``label`` starts the field of every error (``generation_config.json``, ``REPORT``),
    ``path`` is named in the message; ``prefix`` is the dotted path of a nested object."""

    def __init__(self, data: Any, label: str, path: str = "",
                 error: type[SpmdMoeError] = InputError, prefix: str = ""):
        self.label, self.path, self.error, self.prefix = label, path, error, prefix
        if not isinstance(data, dict):
            raise error(self.field(""), f"must be a JSON object, not {json_type(data)}"
                        + (f" ({path})" if path else ""))
        self.data = data

    def field(self, key: str) -> str:
        dotted = f"{self.prefix}.{key}" if self.prefix and key else self.prefix or key
        return f"{self.label} {dotted}" if dotted else self.label

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, kind: str, default: Any = REQUIRED) -> Any:
        """Field ``key`` if it is of ``kind`` (JSON_KINDS); ``default`` when absent or
        null; missing without a default is an error."""
        value = self.data.get(key)
        if value is None:
            if default is REQUIRED:
                raise self.error(self.field(key), "missing" + (f" ({self.path})"
                                                               if self.path else ""))
            return default
        return check_json(value, kind, self.field(key), self.path, self.error)

    def fields(self, key: str, default: Any = REQUIRED) -> "JsonFields | Any":
        """Field ``key``, an object, as JsonFields of its own."""
        value = self.get(key, "object", default)
        if value is default and not isinstance(value, dict):
            return default
        dotted = f"{self.prefix}.{key}" if self.prefix else key
        return JsonFields(value, self.label, self.path, self.error, dotted)


# --- writing: one door -------------------------------------------------------------------

# Temporaries being written (files and directories): removed by discard_staged(), which
# the watchdog calls before it aborts the job on a signal (no Python cleanup runs then).
_STAGED: set[str] = set()


def discard_staged() -> None:
    """Remove every temporary a writer of this process has not renamed into place yet."""
    for path in list(_STAGED):
        _STAGED.discard(path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            try:
                os.unlink(path)
            except OSError:
                pass


def _check_directory_of(path: str, field: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(field, f"directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(field, f"directory {directory} is not writable")


def _lstat_mode(path: str, field: str) -> int | None:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConfigError(field, "the path is empty" if not path else f"{path!r} is not a "
                                                                      "file name")
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(field, f"cannot use {path}: {exc.strerror}") from None


def check_output_path(path: str, field: str = "--output") -> None:
    """Refuse, before any work is done, an output path that is not absent or a regular file
    (a link, directory, FIFO or device is never replaced) or whose directory is missing or
    not writable."""
    mode = _lstat_mode(path, field)
    if mode is not None and file_kind(mode) is not None:
        raise ConfigError(field, f"{path} is {file_kind(mode)}; give a regular file or a new "
                                 "path (it would be replaced)")
    _check_directory_of(path, field)


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (real paths compared, and inodes when both exist)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_paths(*named: tuple[str | None, str],
                       inputs: tuple[tuple[str | None, str], ...] = ()) -> None:
    """Each ``(path, field)`` with a path passes :func:`check_output_path`, no two name
    the same file, and none is one of the command's ``inputs`` (``(path, field)``: a
    command never writes over what it reads)."""
    seen: list[tuple[str, str]] = []
    for path, field in named:
        if path is None:
            continue
        check_output_path(path, field)
        for other, other_field in seen:
            if same_file(path, other):
                raise ConfigError(field, f"{path} is the same file as {other_field} {other}")
        for source, source_field in inputs:
            if source and os.path.exists(source) and same_file(path, source):
                raise ConfigError(field, f"{path} is the input {source_field} {source}: an "
                                         "output never replaces an input")
        seen.append((path, field))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(files: list[tuple[str, str, Callable[[BinaryIO], None]]]) -> None:
    """Write every ``(path, field, writer)`` or none: each goes to a temporary file beside
    its target (mode 0666 less the umask, synced to disk), and only when all are complete
    are they renamed into place, so a reader never sees a partial file and a full disk
    leaves nothing behind. A failure raises :class:`OutputError` naming the field."""
    staged: list[tuple[str, str, str]] = []
    try:
        for path, field, writer in files:
            directory = os.path.dirname(os.path.abspath(path))
            try:
                handle, tmp = tempfile.mkstemp(dir=directory, prefix=".spmd_moe-",
                                               suffix=".tmp")
            except OSError as exc:
                raise OutputError(field, f"cannot write {path}: {exc.strerror}") from None
            _STAGED.add(tmp)
            staged.append((path, field, tmp))
            try:
                os.fchmod(handle, 0o666 & ~_umask())
                with os.fdopen(handle, "wb") as out:
                    writer(out)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise OutputError(field, f"cannot write {path}: "
                                         f"{exc.strerror or exc}") from None
        for path, field, tmp in staged:
            check_output_path(path, field)      # not turned into a link or FIFO meanwhile
        for path, field, tmp in staged:
            os.replace(tmp, path)
            _STAGED.discard(tmp)
    except BaseException:
        for _, _, tmp in staged:
            _STAGED.discard(tmp)
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def check_output_directory(path: str, field: str) -> None:
    """A directory to create (``export``): absent, or an empty directory (never a link,
    a file or a directory with files), in a writable directory."""
    mode = _lstat_mode(path, field)
    if mode is not None:
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
            raise ConfigError(field, f"{path} is {file_kind(mode) or 'a file'}; give a new "
                                     "path or an empty directory")
        if os.listdir(path):
            raise ConfigError(field, f"{path} exists and is not an empty directory")
    _check_directory_of(path, field)


def free_disk_bytes(path: str) -> int:
    """Bytes an unprivileged user may still write in the filesystem of ``path``'s
    directory."""
    info = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return info.f_bavail * info.f_frsize


def write_directory(path: str, field: str, fill: Callable[[str], list[str]],
                    need_bytes: int = 0) -> list[str]:
    """Create directory ``path`` whole or not at all: refused unless the filesystem has
    ``need_bytes`` free; ``fill(tmp)`` writes the files into a temporary sibling directory
    (mode 0777 less the umask), each is synced, and the directory is renamed into place
    when complete (over an empty directory of that name). A failure, an interrupt or a full
    disk leave no directory behind and raise :class:`OutputError` naming ``field``. Returns
    what ``fill`` returned (the file names)."""
    check_output_directory(path, field)
    free = free_disk_bytes(path)
    if need_bytes > free:
        raise OutputError(field, f"{path} needs {need_bytes / 1e9:.2f} GB but its filesystem "
                                 f"has {free / 1e9:.2f} GB free")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        tmp = tempfile.mkdtemp(dir=parent, prefix=".spmd_moe-", suffix=".tmp")
    except OSError as exc:
        raise OutputError(field, f"cannot write {path}: {exc.strerror}") from None
    _STAGED.add(tmp)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            names = fill(tmp)
            for name in os.listdir(tmp):
                _sync(os.path.join(tmp, name))
            _sync(tmp)
            check_output_directory(path, field)     # not taken meanwhile
            os.rename(tmp, path)
            _sync(parent)
        except OSError as exc:
            raise OutputError(field, f"cannot write {path}: {exc.strerror or exc}") from None
        _STAGED.discard(tmp)
        return names
    finally:
        if tmp in _STAGED:
            _STAGED.discard(tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def npz_writer(arrays: dict[str, np.ndarray]) -> Callable[[BinaryIO], None]:
    return lambda out: np.savez(out, **arrays)


def text_writer(text: str) -> Callable[[BinaryIO], None]:
    return lambda out: out.write(text.encode())


def write_npz(path: str, **arrays: np.ndarray) -> None:
    write_files([(path, "--output", npz_writer(arrays))])


def write_text(path: str, text: str, field: str = "--report") -> None:
    write_files([(path, field, text_writer(text))])
