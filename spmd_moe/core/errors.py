"""User-facing errors.

Every error a user can cause (a bad config field, a bad input file, a layout that cannot
work) is a :class:`SpmdMoeError` whose message is one line naming the field and the allowed
values. The CLI prints it once, on rank 0, and every rank exits with status 2. A run that
meets numbers it cannot go on with (:class:`NumericalFault`: non-finite router logits)
brings the whole job down (exit 1) with one line naming the rank and the layer. Anything
else is a bug or a fault and brings the whole job down (``MPI.Abort``) with its traceback.
"""

import sys


def say(line: str) -> None:
    """One whole line on stderr in a single write, flushed. ``print`` writes the text and its
    newline separately, and an interrupt raised between the two glued the next message
    ("spmd-moe: error: interrupted ...") onto the unfinished line; a single write leaves
    the whole line in the buffer even when the flush is interrupted."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(text: str) -> str:
    """``text`` with every character that is not printable (a newline, a carriage return,
    an escape sequence, a line separator, a lone surrogate) written as its backslash
    escape: a message quoting user input stays one line and cannot forge another."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else
                   c.encode("unicode_escape").decode("ascii") for c in text)


class SpmdMoeError(Exception):
    """A rejected input: one line that names the field and what is allowed (any control
    character of either, from user input, escaped: :func:`one_line`)."""

    def __init__(self, field: str, message: str):
        field, message = one_line(str(field)), one_line(str(message))
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def raise_first(comm, error: SpmdMoeError | None) -> None:
    """Collective: if any rank of ``comm`` has an error, every rank raises the first one
    (by rank), so that no rank walks on into a collective the others never reach."""
    found = comm.allgather(None if error is None
                           else (type(error).__name__, error.field, error.message))
    for item in found:
        if item is not None:
            if error is not None and type(error).__name__ == item[0] and \
                    error.field == item[1] and error.message == item[2]:
                raise error
            kind = {cls.__name__: cls for cls in (SpmdMoeError, ConfigError, LayoutError,
                                                  InputError, OutputError)}[item[0]]
            raise kind(item[1], item[2])


def collective(comm, fn, *args, **kwargs):
    """Run ``fn`` on every rank; a :class:`SpmdMoeError` on any rank is raised on all."""
    try:
        value, error = fn(*args, **kwargs), None
    except SpmdMoeError as exc:
        value, error = None, exc
    raise_first(comm, error)
    return value


class ConfigError(SpmdMoeError):
    """A model, workload or run setting that is out of range or inconsistent."""


class LayoutError(SpmdMoeError):
    """A parallel layout that cannot work with this model, world size or device."""


class InputError(SpmdMoeError):
    """An input file (token ids and mask) of the wrong shape, dtype or content."""


class OutputError(SpmdMoeError):
    """An output file that cannot be written (a full disk, a vanished directory)."""


class NumericalFault(RuntimeError):
    """A run met numbers it cannot go on with (non-finite router logits), found on one
    rank mid-run: the job ends (exit 1) with this one line, naming where."""
