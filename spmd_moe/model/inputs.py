"""Inputs at the edge: token ids and mask in (SPEC §4); the outputs' writers are files.py.

Every check on an input file happens here, once, with errors that name the field; inside,
code trusts a :class:`Batch`. Left padding is the only padding (SPEC §1): position S-1 of
every sequence is real. Token ids at padding positions are ignored (any integer will do).
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..core.config import ModelConfig, WorkloadConfig
from ..core.errors import InputError
from ..core.files import open_regular
from .weights import tensor_rng


@dataclass
class Batch:
    """A whole batch, on the host of every rank: ids int64 [B, S], mask bool [B, S]."""

    ids: np.ndarray
    mask: np.ndarray

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per sequence, int64 [B]."""
        return self.mask.sum(axis=1, dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def real_ids(self, seqs: np.ndarray) -> np.ndarray:
        """The real token ids of ``seqs``, packed end to end (int64 [T])."""
        if len(seqs) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.ids[seqs][self.mask[seqs]]


def _check_ids_header(shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise InputError(f"{source} ids", f"must be a 2-D [batch, seq] array, got shape "
                                          f"{tuple(shape)}")
    if not np.issubdtype(dtype, np.integer):
        raise InputError(f"{source} ids", f"must be integers, got dtype {dtype}")


def _check_mask_header(shape: tuple[int, ...], dtype: np.dtype, ids_shape: tuple[int, ...],
                       source: str) -> None:
    if tuple(shape) != tuple(ids_shape):
        raise InputError(f"{source} mask", f"shape {tuple(shape)} must equal ids shape "
                                           f"{tuple(ids_shape)}")
    if dtype != bool and not np.issubdtype(dtype, np.integer):
        raise InputError(f"{source} mask", f"must be bool or 0/1 integers, got dtype {dtype}")


def checked_mask(mask, ids_shape: tuple[int, ...], source: str = "input") -> np.ndarray:
    """The mask (``None``: all real) as bool [B, S], after SPEC §1's checks: 0/1 values,
    left padding, at least one real token per sequence."""
    if mask is None:
        return np.ones(ids_shape, dtype=bool)
    mask = np.asarray(mask)
    _check_mask_header(mask.shape, mask.dtype, ids_shape, source)
    if mask.dtype != bool:
        if mask.size and not np.isin(mask, (0, 1)).all():
            raise InputError(f"{source} mask", "values must be 0 (padding) or 1 (real)")
        mask = mask.astype(bool)
    lengths = mask.sum(axis=1)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise InputError(f"{source} mask", f"sequence {int(empty[0])} has no real token "
                                           "(every sequence needs at least one)")
    not_left = np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1))
    if len(not_left):
        raise InputError(f"{source} mask", f"sequence {int(not_left[0])} is not left-padded: "
                                           "padding (0) must all come before the real tokens")
    return mask


def check_lengths(lengths: np.ndarray, model: ModelConfig, new_tokens: int = 0,
                  source: str = "input") -> None:
    """Every prompt plus the tokens asked for fits in ``max_seq_len``."""
    longest = int(lengths.max())
    if longest + new_tokens > model.max_seq_len:
        seq = int(np.argmax(lengths))
        extra = f" + new_tokens {new_tokens}" if new_tokens else ""
        raise InputError(f"{source} ids", f"sequence {seq} has {longest} real tokens{extra} = "
                                          f"{longest + new_tokens}, more than max_seq_len="
                                          f"{model.max_seq_len}")


def validate_batch(ids, mask, model: ModelConfig, new_tokens: int = 0,
                   source: str = "input") -> Batch:
    """Check ids/mask against SPEC §1 and §6; return a clean :class:`Batch`."""
    ids = np.asarray(ids)
    _check_ids_header(ids.shape, ids.dtype, source)
    mask = checked_mask(mask, ids.shape, source)
    real = ids[mask]
    bad = np.flatnonzero((real < 0) | (real >= model.vocab_size))
    if len(bad):
        raise InputError(f"{source} ids", f"token id {int(real[bad[0]])} is outside "
                                          f"[0, vocab_size={model.vocab_size})")
    check_lengths(mask.sum(axis=1, dtype=np.int64), model, new_tokens, source)
    return Batch(ids.astype(np.int64), mask)


def batch_host_bytes(batch_size: int, seq_len: int) -> int:
    """Host bytes a rank needs for the batch: ids int64 and mask bool [B, S], four times
    over for the copies made while it is built or read, checked and broadcast."""
    return 4 * batch_size * seq_len * (8 + 1)


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")     # a zip's first entry, or an empty zip
NPY_MAGIC = b"\x93NUMPY"


@dataclass
class _Member:
    """One array of the archive, known from its header before its data is read."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    data_offset: int   # bytes of the member before the array data


class InputFile:
    """An input ``.npz`` (``ids`` [B, S], optional ``mask`` [B, S]) whose arrays are read
    one at a time, only after their headers (shape and dtype) have been checked: a file
    claiming a huge array costs nothing until the caller has checked that the batch fits.

    Every problem is an :class:`InputError` naming ``--input`` (or the array) with the
    reason: not a regular file, empty, not a zip, a single ``.npy``, truncated, corrupt
    (CRC), pickled objects, wrong shape or dtype.
    """

    def __init__(self, path: str):
        self.path = path
        self.checked_mask: np.ndarray | None = None   # bool [B, S], once lengths() ran
        self.handle = open_regular(path, "--input", "input")   # the read door
        try:
            self._open_archive()
        except BaseException:
            self.handle.close()
            raise
        names = [n[:-4] for n in self.archive.namelist() if n.endswith(".npy")]
        if "ids" not in names:
            self.close()
            raise InputError("--input", f"{path} has no 'ids' array (found: "
                                        f"{', '.join(names) or 'nothing'})")
        self.ids = self._header("ids")
        _check_ids_header(self.ids.shape, self.ids.dtype, "input")
        self.mask = self._header("mask") if "mask" in names else None
        if self.mask is not None:
            _check_mask_header(self.mask.shape, self.mask.dtype, self.ids.shape, "input")

    def _open_archive(self) -> None:
        path = self.path
        try:
            if os.fstat(self.handle.fileno()).st_size == 0:
                raise InputError("--input", f"{path} is empty (0 bytes), not an .npz file")
            magic = self.handle.read(6)
            self.handle.seek(0)
        except OSError as exc:
            raise InputError("--input", f"cannot read {path}: {exc.strerror}") from None
        if magic.startswith(NPY_MAGIC):
            raise InputError("--input", f"{path} is a single .npy array; save ids (and mask) "
                                        "together with numpy.savez")
        if not magic.startswith(ZIP_MAGIC):
            raise InputError("--input", f"{path} is not an .npz (zip) archive")
        try:
            self.archive = zipfile.ZipFile(self.handle)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise InputError("--input", f"{path} is truncated or not a valid .npz: "
                                        f"{exc}") from None

    @property
    def shape(self) -> tuple[int, int]:
        return self.ids.shape[0], self.ids.shape[1]

    def _header(self, name: str) -> _Member:
        info = self.archive.getinfo(f"{name}.npy")
        try:
            with self.archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                offset = member.tell()
        except (zipfile.BadZipFile, zlib.error) as exc:
            raise InputError("--input", f"{self.path} is corrupt ({name}.npy: {exc})") from None
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"input {name}", f"{name}.npy in {self.path} is not a NumPy "
                                              f"array: {exc}") from None
        if dtype.hasobject:
            raise InputError(f"input {name}", "holds Python objects (pickled data), not "
                                              "numbers; they are never loaded")
        expected = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
        if info.file_size != expected:
            raise InputError("--input", f"{self.path} is truncated: {name}.npy declares "
                                        f"{tuple(shape)} {dtype} ({expected} bytes) but holds "
                                        f"{info.file_size} bytes")
        return _Member(name, tuple(shape), dtype, fortran, offset)

    def _read(self, member: _Member) -> np.ndarray:
        array = np.empty(int(np.prod(member.shape, dtype=object)), dtype=member.dtype)
        try:
            with self.archive.open(f"{member.name}.npy") as handle:
                handle.read(member.data_offset)
                got = handle.readinto(memoryview(array).cast("B"))
                extra = handle.read(1)           # reach the end: the CRC is checked there
        except (zipfile.BadZipFile, zlib.error) as exc:
            raise InputError("--input", f"{self.path} is corrupt ({member.name}.npy: "
                                        f"{exc})") from None
        except (OSError, EOFError, ValueError) as exc:
            raise InputError("--input", f"{self.path}: cannot read {member.name}.npy: "
                                        f"{exc}") from None
        if got != array.nbytes or extra:
            raise InputError("--input", f"{self.path} is truncated: {member.name}.npy holds "
                                        f"{got + len(extra)} of {array.nbytes} bytes")
        return array.reshape(member.shape, order="F" if member.fortran else "C")

    def lengths(self) -> np.ndarray:
        """Real tokens per sequence, int64 [B], from the checked mask (the ids unread)."""
        self.checked_mask = checked_mask(self._read(self.mask) if self.mask else None,
                                         self.ids.shape)
        return self.checked_mask.sum(axis=1, dtype=np.int64)

    def batch(self, model: ModelConfig, new_tokens: int = 0) -> Batch:
        """The whole batch, checked (reads the ids; the mask once)."""
        mask = self.checked_mask
        if mask is None:
            mask = self._read(self.mask) if self.mask else None
        return validate_batch(self._read(self.ids), mask, model, new_tokens, source="input")

    def close(self) -> None:
        self.archive.close()
        self.handle.close()


def load_input(path: str, model: ModelConfig, new_tokens: int = 0) -> Batch:
    """Read and check an ``.npz`` with ``ids`` [B, S] and optional ``mask`` [B, S]."""
    source = InputFile(path)
    try:
        return source.batch(model, new_tokens)
    finally:
        source.close()


def synthetic_lengths(workload: WorkloadConfig, seed: int) -> np.ndarray:
    """Real tokens per sequence [B] of :func:`synthetic_input`'s batch, without building it."""
    lengths = np.full(workload.batch_size, workload.seq_len, dtype=np.int64)
    if workload.pad_fraction > 0:
        lengths -= _synthetic_padding(workload, seed)
    return lengths


def _synthetic_padding(workload: WorkloadConfig, seed: int) -> np.ndarray:
    most = min(workload.seq_len - 1, int(2 * workload.pad_fraction * workload.seq_len))
    return tensor_rng(seed, "input.padding").integers(0, most + 1, workload.batch_size)


def synthetic_input(workload: WorkloadConfig, model: ModelConfig, seed: int) -> Batch:
    """SPEC §1's synthetic batch: ids from ``rng("input")``; with ``pad_fraction`` > 0 each
    sequence gets a left padding drawn uniformly from ``[0, 2 * pad_fraction * S]`` (at most
    S - 1) by ``rng("input.padding")``, so a fraction ``pad_fraction`` is padding on average."""
    shape = (workload.batch_size, workload.seq_len)
    ids = tensor_rng(seed, "input").integers(0, model.vocab_size, shape)
    mask = np.ones(shape, dtype=bool)
    if workload.pad_fraction > 0:
        pads = _synthetic_padding(workload, seed)
        mask &= np.arange(workload.seq_len)[None, :] >= pads[:, None]
    return Batch(ids.astype(np.int64), mask)


