"""Files the program writes: output paths checked before any work, and atomic writers.

- :func:`check_output_path` / :func:`check_output_paths`: an output is absent or a regular
  file in a writable directory; never a link, directory, FIFO or device; never the same
  path twice (SPEC §6). Raise ConfigError naming the option.
- :func:`write_files`: each file written to a temporary sibling and renamed into place,
  all or none, honouring the umask; a full disk leaves no partial file.
"""
from __future__ import annotations

import os
import stat
import tempfile
from typing import BinaryIO, Callable

import numpy as np

from .errors import ConfigError, OutputError


def file_kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_output_path(path: str, field: str = "--output") -> None:
    """Refuse, before any work is done, an output path that is not absent or a regular file
    (a link, directory, FIFO or device is never replaced) or whose directory is missing or
    not writable."""
    if not path:
        raise ConfigError(field, "the path is empty")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ConfigError(field, f"cannot use {path}: {exc.strerror}") from None
    if mode is not None and file_kind(mode) is not None:
        raise ConfigError(field, f"{path} is {file_kind(mode)}; give a regular file or a new "
                                 "path (it would be replaced)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(field, f"directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(field, f"directory {directory} is not writable")


def check_output_paths(*named: tuple[str | None, str]) -> None:
    """Each ``(path, field)`` with a path passes :func:`check_output_path`, and no two name
    the same file (compared by real path, and by inode when both exist)."""
    seen: list[tuple[str, str]] = []
    for path, field in named:
        if path is None:
            continue
        check_output_path(path, field)
        for other, other_field in seen:
            same = os.path.realpath(path) == os.path.realpath(other)
            if not same and os.path.exists(path) and os.path.exists(other):
                same = os.path.samefile(path, other)
            if same:
                raise ConfigError(field, f"{path} is the same file as {other_field} {other}")
        seen.append((path, field))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    except BaseException:
        for _, _, tmp in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def npz_writer(arrays: dict[str, np.ndarray]) -> Callable[[BinaryIO], None]:
    return lambda out: np.savez(out, **arrays)


def text_writer(text: str) -> Callable[[BinaryIO], None]:
    return lambda out: out.write(text.encode())


def write_npz(path: str, **arrays: np.ndarray) -> None:
    write_files([(path, "--output", npz_writer(arrays))])


def write_text(path: str, text: str, field: str = "--report") -> None:
    write_files([(path, field, text_writer(text))])
