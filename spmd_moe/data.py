"""Inputs and outputs at the edge: token ids and mask in, hidden/logits/counts out (SPEC §4).

Every check on an input file happens here, once, with errors that name the field; inside,
code trusts a :class:`Batch`. Left padding is the only padding (SPEC §1): position S-1 of
every sequence is real. Token ids at padding positions are ignored (any integer will do).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig, WorkloadConfig
from .errors import ConfigError, InputError
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


def validate_batch(ids, mask, model: ModelConfig, new_tokens: int = 0,
                   source: str = "input") -> Batch:
    """Check ids/mask against SPEC §1 and §6; return a clean :class:`Batch`."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise InputError(f"{source} ids", f"must be a 2-D [batch, seq] array, got shape "
                                          f"{tuple(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{source} ids", f"must be integers, got dtype {ids.dtype}")
    if mask is None:
        mask = np.ones(ids.shape, dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != ids.shape:
            raise InputError(f"{source} mask", f"shape {tuple(mask.shape)} must equal ids shape "
                                               f"{tuple(ids.shape)}")
        if mask.dtype != bool:
            if not np.issubdtype(mask.dtype, np.integer):
                raise InputError(f"{source} mask", f"must be bool or 0/1 integers, got dtype "
                                                   f"{mask.dtype}")
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
    real = ids[mask]
    bad = np.flatnonzero((real < 0) | (real >= model.vocab_size))
    if len(bad):
        raise InputError(f"{source} ids", f"token id {int(real[bad[0]])} is outside "
                                          f"[0, vocab_size={model.vocab_size})")
    longest = int(lengths.max())
    if longest + new_tokens > model.max_seq_len:
        seq = int(np.argmax(lengths))
        extra = f" + new_tokens {new_tokens}" if new_tokens else ""
        raise InputError(f"{source} ids", f"sequence {seq} has {longest} real tokens{extra} = "
                                          f"{longest + new_tokens}, more than max_seq_len="
                                          f"{model.max_seq_len}")
    return Batch(ids.astype(np.int64), mask)


def load_input(path: str, model: ModelConfig, new_tokens: int = 0) -> Batch:
    """Read an ``.npz`` with ``ids`` [B, S] and optional ``mask`` [B, S]."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "ids" not in archive.files:
                raise InputError("--input", f"{path} has no 'ids' array (found: "
                                            f"{', '.join(archive.files) or 'nothing'})")
            ids = archive["ids"]
            mask = archive["mask"] if "mask" in archive.files else None
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError("--input", f"cannot read {path} as .npz: {exc}") from None
    return validate_batch(ids, mask, model, new_tokens, source="input")


def synthetic_input(workload: WorkloadConfig, model: ModelConfig, seed: int) -> Batch:
    """SPEC §1's synthetic batch: ids from ``rng("input")``; with ``pad_fraction`` > 0 each
    sequence gets a left padding drawn uniformly from ``[0, 2 * pad_fraction * S]`` (at most
    S - 1) by ``rng("input.padding")``, so a fraction ``pad_fraction`` is padding on average."""
    shape = (workload.batch_size, workload.seq_len)
    ids = tensor_rng(seed, "input").integers(0, model.vocab_size, shape)
    mask = np.ones(shape, dtype=bool)
    if workload.pad_fraction > 0:
        most = min(workload.seq_len - 1, int(2 * workload.pad_fraction * workload.seq_len))
        pads = tensor_rng(seed, "input.padding").integers(0, most + 1, workload.batch_size)
        mask &= np.arange(workload.seq_len)[None, :] >= pads[:, None]
    return Batch(ids.astype(np.int64), mask)


def check_output_path(path: str, field: str = "--output") -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(field, f"directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise ConfigError(field, f"directory {directory} is not writable")


def _write_atomic(path: str, write) -> None:
    """Write through a temporary file and rename: a reader never sees a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".spmd_moe-")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_npz(path: str, **arrays: np.ndarray) -> None:
    _write_atomic(path, lambda out: np.savez(out, **arrays))


def write_text(path: str, text: str) -> None:
    _write_atomic(path, lambda out: out.write(text.encode()))
