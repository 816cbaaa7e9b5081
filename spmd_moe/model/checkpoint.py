"""Hugging Face model directories (SPEC §8): config.json, safetensors weights (one file, or
shards listed in model.safetensors.index.json), generation_config.json; read rank-locally.

Reading. A safetensors file is 8 bytes of little-endian header length, a JSON header (per
tensor: dtype, shape, data offsets) and the raw little-endian data. Every file is opened
through the read door (core/files.py: a regular file of the model directory). Every rank
reads the headers first (each sized by what the model needs before it is read), checks that
each tensor the model needs is there with the right shape and a float dtype, keeps only
those, and only then maps the files (``numpy.memmap``) and
copies out the slices it owns: its stage's layers, its experts, its heads and F columns
under TP, the embedding on the first stage, the LM head on the last. Nothing else is
touched, so on a shared filesystem each rank reads its share. Tensors stay in the
checkpoint's dtype (bfloat16 through ml_dtypes) up to the backend, which on a GPU copies
them to the device as they are; a run in another dtype converts on load.

The ``safetensors`` package's numpy API (``safe_open``) copies whole tensors or slices into
new arrays and, in older releases, has no bfloat16; the header is simple enough to read
here, which gives memory-mapped views, header-first checks over all shards, and the bytes
each rank reads. Writing (``spmd-moe export``) streams a tensor at a time into a directory
that appears whole or not at all (files.write_directory).

FP8 checkpoints (DeepSeek's ``quantization_config``: ``ModelConfig.fp8_block``): a matrix
stored as ``float8_e4m3fn`` comes with a float32 ``<name>_scale_inv`` of one scale per
``[bo, bi]`` block (edge blocks partial); a rank reads its block of both and dequantises,
``W[i, j] = W8[i, j] * S[i // bo, j // bi]`` in float32, then rounds to the run's dtype.

Errors a user can cause (missing file or tensor, wrong shape or dtype, a shard the index
names but that is absent or outside the directory, a truncated file, a malformed or
oversized header) raise InputError naming the tensor or field and the file.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

import ml_dtypes
import numpy as np

from ..backend.array import BF16, Backend, storage_dtype
from ..core.config import (ALIASES, DTYPES, DTYPE_ALIASES, MODEL_FIELDS, RunConfig, WorkloadConfig,
                           apply_settings, parse_set)
from ..core.errors import ConfigError, InputError
from ..core.files import (JsonFields, check_output_directory, open_regular, parse_json,
                          plain_name, read_json, resolves_inside, write_directory)
from ..core.topology import Grid
from .families import (checkpoint_tensors, hf_config, ignored, model_config_from_hf,
                       tensor_location)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
# Float dtypes we load (converted to the run's dtype when it differs); anything else
# (integers, float8, quantised blocks) is refused.
FLOAT_DTYPES = {"BF16": BF16, "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
                "F64": np.dtype("<f8")}
# Block-quantised weights (with a float32 ``<name>_scale_inv`` of per-block scales).
FP8_DTYPES = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
SCALE_SUFFIX = "_scale_inv"
# Every float8_e4m3fn byte's float32 value: a table lookup widens a block exactly, at
# NumPy's gather speed (ml_dtypes' cast runs element by element).
FP8_VALUES = np.arange(256, dtype=np.uint8).view(FP8_DTYPES["F8_E4M3"]).astype(np.float32)
SAFETENSORS_NAMES = {BF16: "BF16", np.dtype(np.float32): "F32"}
HEADER_LIMIT = 100 << 20   # the format's own bound on the JSON header
# A header is sized before it is held: at most this many bytes per tensor the model needs
# (a real entry takes ~150), plus room for __metadata__, and never more than HEADER_LIMIT.
HEADER_BYTES_PER_TENSOR = 1024
HEADER_SLACK = 1 << 20
# Settings a run may change on top of a checkpoint's config.json (the rest is the model).
MODEL_OVERRIDES = ("dtype", "max_seq_len")


# --- config.json and generation_config.json ------------------------------------------

def read_model_json(directory: str, name: str, kind: str = "config") -> Any:
    """File ``name`` of model directory ``directory`` as JSON, through the read door: a
    regular file of that directory (symlinks resolved; a hub cache's blobs allowed), capped
    by its kind, UTF-8, bounded depth. Errors name the file."""
    return read_json(os.path.join(directory, name), name, kind, inside=directory)


def model_files(directory: str) -> list[str]:
    """The files of model directory ``directory`` a run may read (config.json, the
    generation config, tokenizer, index and safetensors files), as paths; none for a
    directory that is not one."""
    read = (CONFIG_FILE, GENERATION_FILE, TOKENIZER_FILE, INDEX_FILE)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in sorted(names)
            if n in read or n.endswith(".safetensors")]


def read_hf_config(directory: str) -> dict:
    """config.json of a model directory, as a dict (``--model`` named on failure)."""
    if not os.path.isdir(directory):
        raise InputError("--model", f"{directory} is not a directory")
    return JsonFields(read_model_json(directory, CONFIG_FILE), CONFIG_FILE,
                      os.path.join(directory, CONFIG_FILE)).data


def checkpoint_run_config(directory: str, sets: list[str] | None = None,
                          **overrides: Any) -> RunConfig:
    """The RunConfig of ``--model DIR``: the model from config.json (nothing else is read),
    the workload from ``--set`` and keyword overrides; validated. Model fields other than
    ``dtype`` and ``max_seq_len`` are the checkpoint's and refused as overrides."""
    settings = parse_set(sets or [])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    for key in settings:
        canonical = ALIASES.get(key, key)
        if key == "init":
            raise ConfigError("--init", "weights come from --model")
        if canonical in MODEL_FIELDS and canonical not in MODEL_OVERRIDES:
            raise ConfigError(f"--set {key}", f"fixed by {os.path.join(directory, CONFIG_FILE)}"
                                              f" under --model (only "
                                              f"{', '.join(MODEL_OVERRIDES)} and the workload "
                                              "may be set)")
    dtype = None
    for key in [k for k in settings if ALIASES.get(k, k) == "dtype"]:
        value = settings.pop(key)
        dtype = DTYPE_ALIASES.get(str(value).lower())
        if dtype is None:
            raise ConfigError("dtype", f"{value!r} is not one of {', '.join(DTYPES)}")
    model = model_config_from_hf(read_hf_config(directory), dtype)
    base = RunConfig(model, WorkloadConfig(), checkpoint=directory)
    return apply_settings(base, settings).validate()


def eos_token_ids(directory: str, vocab_size: int | None = None) -> list[int]:
    """The checkpoint's end-of-sequence ids: generation_config.json's ``eos_token_id``,
    else config.json's (an int or a list); empty when neither names one. Each id is
    checked to be a token id (below ``vocab_size`` when given)."""
    for name in (GENERATION_FILE, CONFIG_FILE):
        path = os.path.join(directory, name)
        if not os.path.lexists(path):
            continue
        fields = JsonFields(read_model_json(directory, name), name, path)
        value = fields.get("eos_token_id", "integer|integers", None)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        top = vocab_size if vocab_size is not None else 1 << 31
        bad = [v for v in values if not 0 <= v < top]
        if bad:
            raise InputError(f"{name} eos_token_id", f"{bad[0]} is not a token id (0 .. "
                                                     f"{top - 1}) ({path})")
        return [int(v) for v in values]
    return []


# --- safetensors headers ---------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are (absolute offsets)."""

    name: str
    file: str
    dtype: str           # safetensors' name: BF16, F32, ...
    shape: tuple[int, ...]
    begin: int
    end: int


def header_limit(model=None) -> int:
    """The largest safetensors header read for ``model``: HEADER_BYTES_PER_TENSOR for each
    tensor it needs (counted up to the point where HEADER_LIMIT wins, never listed whole)
    plus HEADER_SLACK; HEADER_LIMIT without a model."""
    if model is None:
        return HEADER_LIMIT
    most = (HEADER_LIMIT - HEADER_SLACK) // HEADER_BYTES_PER_TENSOR + 1
    count = sum(1 for _ in itertools.islice(checkpoint_tensors(model), most))
    return min(HEADER_LIMIT, HEADER_SLACK + HEADER_BYTES_PER_TENSOR * count)


def parse_header(handle: BinaryIO, path: str,
                 limit: int = HEADER_LIMIT) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file (``handle``, opened by the read door), from its
    header alone: its length checked against ``limit`` and the file's size before it is
    read, every entry type-checked (dtype a string, shape and offsets integers), no two
    entries' data overlapping, and every offset inside the file (a truncated file is caught
    before any data is read)."""
    label = os.path.basename(path)
    try:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InputError(label, f"{path} is too short to be a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > limit:
            raise InputError(label, f"{path}: header of {length} bytes; the tensors this "
                                    f"model needs take at most {limit}")
        if 8 + length > size:
            raise InputError(label, f"{path}: header length {length} does not fit the "
                                    f"file ({size} bytes); not a safetensors file?")
        raw = handle.read(length)
    except OSError as exc:
        raise InputError(label, f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(label, f"{path}: header is not UTF-8 JSON") from None
    header = JsonFields(parse_json(text, path, label), label, path).data
    start, entries = 8 + length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name}"
        info = JsonFields(info, where, path)
        dtype = info.get("dtype", "string")
        shape = tuple(info.get("shape", "integers"))
        offsets = info.get("data_offsets", "integers")
        if len(offsets) != 2:
            raise InputError(f"{where} data_offsets", f"{offsets} must be [begin, end] "
                                                      f"({path})")
        if min(shape, default=0) < 0:
            raise InputError(f"{where} shape", f"{list(shape)} has a negative size ({path})")
        begin, end = offsets
        if not 0 <= begin <= end or start + end > size:
            raise InputError(where, f"data offsets [{begin}, {end}) run past the end of {path} "
                                    f"({size} bytes): truncated?")
        known = {**FLOAT_DTYPES, **FP8_DTYPES}
        itemsize = known[dtype].itemsize if dtype in known else None
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise InputError(where, f"{path}: {end - begin} bytes for shape {list(shape)} of "
                                    f"{dtype}")
        entries[name] = TensorEntry(name, path, dtype, shape, start + begin, start + end)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise InputError(f"tensor {second}", f"its data overlaps tensor {first}'s in "
                                                 f"{path}")
    return entries


def read_header(path: str, limit: int = HEADER_LIMIT) -> dict[str, TensorEntry]:
    """:func:`parse_header` of the file ``path`` (opened through the read door)."""
    with open_regular(path, os.path.basename(path), "weights") as handle:
        return parse_header(handle, path, limit)


# --- a model directory -----------------------------------------------------------------

def shard_path(directory: str, shard: str) -> str:
    """The path of shard ``shard`` named by the index of model directory ``directory``.

    A shard is a plain file name of the model directory: no separator, no ``..``, no
    absolute path, no control character; and once symlinks are resolved it still lies
    inside the directory. Refused (InputError naming the index) before anything is opened,
    so an index can never make a rank read a file outside its model directory."""
    label = f"{INDEX_FILE} weight_map"
    if not plain_name(shard):
        raise InputError(label, f"shard {shard!r} is not a plain file name of {directory}")
    path = os.path.join(directory, shard)
    if not resolves_inside(directory, path):
        raise InputError(label, f"shard {shard!r} resolves to a file outside {directory}")
    return path


def read_index(directory: str) -> dict[str, str]:
    """model.safetensors.index.json's weight_map as ``{tensor: shard path}``: every shard
    name checked (:func:`shard_path`) and every shard present, before any shard is
    opened."""
    index_path = os.path.join(directory, INDEX_FILE)
    index = JsonFields(read_model_json(directory, INDEX_FILE, "index"), INDEX_FILE, index_path)
    weight_map = index.get("weight_map", "object")
    if not weight_map:
        raise InputError(INDEX_FILE, f"{index_path} has no weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(f"{INDEX_FILE} weight_map", f"the shard of {name!r} must be a "
                                                          f"file name, not {shard!r}")
    paths = {shard: shard_path(directory, shard) for shard in sorted(set(weight_map.values()))}
    for shard, path in paths.items():
        if not os.path.lexists(path):
            first = next(n for n, f in weight_map.items() if f == shard)
            raise InputError(INDEX_FILE, f"shard {shard} (holding {first}, ...) is named by "
                                         f"{index_path} but absent")
    return {name: paths[shard] for name, shard in weight_map.items()}


@dataclass
class LoadStats:
    """What one rank read: bytes of tensor data copied out of the mapped files, the time
    it took (headers, checks and copies to the backend), and the files it touched."""

    bytes_read: int = 0
    seconds: float = 0.0
    files: set[str] = field(default_factory=set)


class Checkpoint:
    """The safetensors files of a model directory, by header (no data read yet).

    ``tensors``: tensor name -> its :class:`TensorEntry`. With a ``model``, headers are
    sized by what it needs and read as :meth:`check` walks its tensors (stopping at the
    first one missing), and only its tensors are kept; without, every tensor of every
    file. Each file is opened once, through the read door, and mapped from that handle.
    Use :meth:`check` before reading, then :meth:`read` for the slices a rank owns.
    """

    def __init__(self, directory: str, model=None):
        self.directory = directory
        self.tensors: dict[str, TensorEntry] = {}
        self.stats = LoadStats()
        self._files: dict[str, BinaryIO] = {}
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        self.fp8_block: tuple[int, int] | None = None   # FP8 scales' block (from check)
        self._maps: dict[str, np.memmap] = {}
        self.limit = header_limit(model)
        self.weight_map: dict[str, str] | None = None
        if os.path.lexists(os.path.join(directory, INDEX_FILE)):
            self.weight_map = read_index(directory)
        elif not os.path.lexists(os.path.join(directory, SINGLE_FILE)):
            raise InputError("--model", f"{directory} has neither {SINGLE_FILE} nor "
                                        f"{INDEX_FILE}")
        if model is None:
            for path in sorted(set(self.weight_map.values()) if self.weight_map else
                               [os.path.join(directory, SINGLE_FILE)]):
                self.tensors.update(self._header(path))

    def _header(self, path: str) -> dict[str, TensorEntry]:
        if path not in self._headers:
            handle = open_regular(path, os.path.basename(path), "weights",
                                  inside=self.directory)
            self._files[path] = handle
            self._headers[path] = parse_header(handle, path, self.limit)
        return self._headers[path]

    def where(self) -> str:
        return INDEX_FILE if self.weight_map is not None else SINGLE_FILE

    def find(self, name: str) -> TensorEntry:
        """The entry of tensor ``name`` (reading its file's header on first use)."""
        if self.weight_map is None:
            entry = self._header(os.path.join(self.directory, SINGLE_FILE)).get(name)
        else:
            shard = self.weight_map.get(name)
            if shard is None:
                raise InputError(f"tensor {name}", f"missing from {INDEX_FILE} in "
                                                   f"{self.directory}")
            entry = self._header(shard).get(name)
            if entry is None:
                raise InputError(f"tensor {name}", f"not in {os.path.basename(shard)}, "
                                                   f"where {INDEX_FILE} places it")
        if entry is None:
            raise InputError(f"tensor {name}", f"missing from {self.where()} in "
                                               f"{self.directory}")
        return entry

    def check(self, model) -> None:
        """Every tensor ``model`` needs is present with its shape and a float dtype (all of
        them, on every rank: the same error everywhere, whatever the layout), walked in the
        model's order and stopping at the first that is not; then only those are kept (an
        FP8 matrix with its scales)."""
        self.fp8_block = model.fp8_block
        for ours, where in checkpoint_tensors(model):
            entry = self.find(where.name)
            label = f"tensor {where.name}"
            if entry.dtype in FP8_DTYPES and model.fp8_block is not None and \
                    len(where.shape) == 2:
                self._check_scales(where.name, where.shape, model.fp8_block)
            elif entry.dtype not in FLOAT_DTYPES:
                fp8 = (" (float8 weights need config.json's quantization_config)"
                       if entry.dtype in FP8_DTYPES else "")
                raise InputError(label, f"dtype {entry.dtype} in {os.path.basename(entry.file)}"
                                        f": only {', '.join(FLOAT_DTYPES)} load{fp8}")
            if entry.shape != where.shape:
                raise InputError(label, f"shape {list(entry.shape)} in "
                                        f"{os.path.basename(entry.file)}, but config.json "
                                        f"gives {list(where.shape)}")
            self.tensors[where.name] = entry
        self._headers.clear()

    def _check_scales(self, name: str, shape: tuple[int, ...], block: tuple[int, int]) -> None:
        """An FP8 matrix's ``<name>_scale_inv``: present, float32, one per block."""
        label = f"tensor {name + SCALE_SUFFIX}"
        try:
            scales = self.find(name + SCALE_SUFFIX)
        except InputError:
            raise InputError(label, f"missing from {self.where()} in {self.directory} "
                                    f"({name} is float8)") from None
        want = tuple(-(-n // b) for n, b in zip(shape, block))
        if scales.dtype != "F32" or scales.shape != want:
            raise InputError(label, f"{scales.dtype} {list(scales.shape)} in "
                                    f"{os.path.basename(scales.file)}, but weight_block_size "
                                    f"{list(block)} gives F32 {list(want)}")
        self.tensors[name + SCALE_SUFFIX] = scales

    def read(self, name: str, rows: range | None = None, cols: range | None = None) -> np.ndarray:
        """The ``[rows, cols]`` block of tensor ``name`` as a host array in the checkpoint's
        dtype (a copy: only these bytes are read from the mapped file); an FP8 matrix's
        block dequantised to float32 with its blocks' scales (those read too)."""
        entry = self.tensors[name]
        if entry.dtype in FP8_DTYPES:
            return self._dequantised(entry, rows, cols)
        return self._block(entry, FLOAT_DTYPES[entry.dtype], rows, cols)

    def _dequantised(self, entry: TensorEntry, rows: range | None,
                     cols: range | None) -> np.ndarray:
        """``W8[rows, cols] * S[i // bo, j // bi]`` in float32 (the scales' block read)."""
        scales = self.tensors[entry.name + SCALE_SUFFIX]
        rows = rows if rows is not None else range(entry.shape[0])
        cols = cols if cols is not None else range(entry.shape[1])
        assert self.fp8_block is not None, "check() reads the block size first"
        block_rows, block_cols = self.fp8_block
        weights = FP8_VALUES[self._block(entry, np.dtype(np.uint8), rows, cols)]  # [r, c]
        if not len(rows) or not len(cols):
            return weights
        s_rows = range(rows.start // block_rows, (rows.stop - 1) // block_rows + 1)
        s_cols = range(cols.start // block_cols, (cols.stop - 1) // block_cols + 1)
        scale = self._block(scales, FLOAT_DTYPES["F32"], s_rows, s_cols)
        row_of = np.arange(rows.start, rows.stop) // block_rows - s_rows.start
        col_of = np.arange(cols.start, cols.stop) // block_cols - s_cols.start
        return weights * scale[row_of][:, col_of]

    def _block(self, entry: TensorEntry, dtype: np.dtype, rows: range | None,
               cols: range | None) -> np.ndarray:
        if entry.file not in self._maps:
            self._maps[entry.file] = np.memmap(self._files[entry.file], dtype=np.uint8,
                                               mode="r")
        raw = self._maps[entry.file][entry.begin:entry.end]
        view = raw.view(dtype).reshape(entry.shape)
        if rows is not None:
            view = view[rows.start:rows.stop]
        if cols is not None:
            view = view[:, cols.start:cols.stop]
        block = np.array(view)           # the read itself
        if block.dtype.byteorder == ">":
            block = block.byteswap().view(block.dtype.newbyteorder("<"))
        self.stats.bytes_read += block.nbytes
        self.stats.files.add(os.path.basename(entry.file))
        return block

    def close(self) -> None:
        self._maps.clear()
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def open_checkpoint(directory: str, model) -> Checkpoint:
    """Headers of the files holding ``model``'s tensors, sized by what it needs, then
    :meth:`Checkpoint.check`; nothing is allocated for weights yet. Raises InputError
    naming the tensor and file."""
    started = time.perf_counter()
    checkpoint = Checkpoint(directory, model)
    try:
        checkpoint.check(model)
    except BaseException:
        checkpoint.close()
        raise
    checkpoint.stats.seconds += time.perf_counter() - started
    return checkpoint


class CheckpointSource:
    """weights.build_weights' source for a checkpoint: our names and ``[in, out]`` blocks,
    read from the checkpoint's names and ``[out, in]`` layout (families.tensor_location),
    in the run's storage dtype (no float32 detour for bfloat16: the backend gets bf16)."""

    def __init__(self, model, backend: Backend, checkpoint: Checkpoint):
        self.model, self.backend, self.checkpoint = model, backend, checkpoint

    def _host(self, ours: str, rows: range | None, cols: range | None,
              compute: bool = True) -> np.ndarray:
        """Our ``[rows, cols]`` block of ``ours`` on the host: in the storage dtype, or with
        ``compute`` in the backend's compute form (NumPy: float32 holding the same values,
        see Backend.param), C-contiguous."""
        where = tensor_location(self.model, ours)
        if where.transposed:             # ours [rows, cols] is theirs [cols, rows]
            block = self.checkpoint.read(where.name, cols, rows)
        else:
            block = self.checkpoint.read(where.name, rows, cols)
        storage = self.backend.dtype
        if block.dtype != storage:       # a run in another dtype: convert (round) once
            block = block.astype(storage)
        if compute and not self.backend.on_gpu and storage == BF16:
            block = widen_bf16(block)    # exact; before the transpose, which is then native
        return transpose(block) if where.transposed else block

    def param(self, name: str, rows: range | None = None, cols: range | None = None):
        return self.backend.param(self._host(name, rows, cols))

    def gain(self, name: str, cols: range | None = None, float32: bool = False):
        """1-D tensor ``name`` (its block ``cols``) in compute form, or as float32 whatever
        the run's dtype (``float32``: biases added in float32, the router's selection
        bias)."""
        if not float32:
            return self.backend.param(self._host(name, cols, None))   # 1-D: cols is axis 0
        where = tensor_location(self.model, name)
        block = self.checkpoint.read(where.name, cols)
        return self.backend.asarray(np.ascontiguousarray(block.astype(np.float32)))

    def embedding(self):
        return self.backend.asarray(self._host("embed", None, None, compute=False),
                                    self.backend.dtype)


def widen_bf16(block: np.ndarray) -> np.ndarray:
    """bfloat16 -> float32, exactly, by moving the 16 bits up (NumPy's cast through
    ml_dtypes runs element by element: ~10x slower on checkpoint-sized tensors)."""
    return (block.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def transpose(block: np.ndarray, tile: int = 64) -> np.ndarray:
    """A C-contiguous transpose of a 2-D block, copied in ``tile`` x ``tile`` squares (a
    plain strided copy of a large matrix misses the cache on every element: ~1.7x slower
    here); 16-bit blocks move as uint16 (NumPy's own copy loop, not ml_dtypes')."""
    if block.dtype == BF16:
        return transpose(block.view(np.uint16), tile).view(BF16)
    rows, cols = block.shape
    out = np.empty((cols, rows), dtype=block.dtype)
    for r in range(0, rows, tile):
        for c in range(0, cols, tile):
            out[c:c + tile, r:r + tile] = block[r:r + tile, c:c + tile].T
    return out


def load_weights(grid: Grid, backend: Backend, checkpoint: Checkpoint, progress=None):
    """This rank's :class:`weights.ModelWeights` from ``checkpoint`` (checked already by
    :func:`open_checkpoint`); the time goes into ``checkpoint.stats``. ``progress``:
    weights.build_weights'."""
    from .weights import build_weights

    started = time.perf_counter()
    weights = build_weights(grid, backend, source=CheckpointSource(grid.model, backend,
                                                                   checkpoint),
                            progress=progress)
    backend.synchronize()
    checkpoint.stats.seconds += time.perf_counter() - started
    checkpoint.close()
    return weights


# --- writing (spmd-moe export) ---------------------------------------------------------

def shard_plan(sizes: list[tuple[str, int]], max_bytes: int | None) -> list[list[str]]:
    """Tensors in order, cut into shards of at most ``max_bytes`` each (a tensor larger
    than that gets a shard of its own); one shard when ``max_bytes`` is None."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if max_bytes is not None and shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_safetensors(out: BinaryIO, tensors: list[tuple[str, tuple[int, ...]]],
                      dtype: np.dtype, arrays: Iterator[np.ndarray]) -> None:
    """One safetensors file: the header of ``tensors`` (name, shape; all of ``dtype``),
    laid out in order, then each array of ``arrays`` as it comes (one tensor in memory at a
    time; the format's reader in the safetensors package reads it)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                 # data 8-byte aligned, as the package does
    out.write(len(raw).to_bytes(8, "little") + raw)
    for (name, shape), array in zip(tensors, arrays):
        array = np.ascontiguousarray(array, dtype=dtype)
        assert array.shape == tuple(shape), (name, array.shape, shape)
        out.write(array.reshape(-1).view(np.uint8).data)


def write_checkpoint(directory: str, config_json: dict,
                     tensors: Iterator[tuple[str, np.ndarray]],
                     shapes: list[tuple[str, tuple[int, ...]]], dtype: np.dtype,
                     max_shard_bytes: int | None = None) -> list[str]:
    """Write config.json and the tensors (produced in ``shapes``' order by ``tensors``) as
    model.safetensors, or shards plus model.safetensors.index.json when they exceed
    ``max_shard_bytes``, into ``directory`` (a new one: files.write_directory's). Holds one
    tensor in memory at a time. Returns the files written."""
    sizes = [(name, math.prod(shape) * dtype.itemsize) for name, shape in shapes]
    plan = shard_plan(sizes, max_shard_bytes)
    names = ([SINGLE_FILE] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    shape_of = dict(shapes)
    weight_map, written = {}, []
    produced = iter(tensors)

    def arrays(shard: list[str]) -> Iterator[np.ndarray]:
        for expected in shard:
            name, array = next(produced)
            assert name == expected, (name, expected)
            yield array

    for shard, file_name in zip(plan, names):
        with open(os.path.join(directory, file_name), "xb") as out:
            write_safetensors(out, [(name, shape_of[name]) for name in shard], dtype,
                              arrays(shard))
        weight_map.update(dict.fromkeys(shard, file_name))
        written.append(file_name)
    documents = [(CONFIG_FILE, config_json)]
    if len(plan) > 1:
        total = sum(nbytes for _, nbytes in sizes)
        documents.insert(0, (INDEX_FILE, {"metadata": {"total_size": total},
                                          "weight_map": weight_map}))
    for file_name, document in documents:
        with open(os.path.join(directory, file_name), "x") as handle:
            json.dump(document, handle, indent=2)
        written.append(file_name)
    return written


def export_memory_bytes(shapes: list[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> int:
    """Host memory ``export`` holds at its peak: the largest tensor's float32 draw, its
    transposed copy in ``dtype`` and the cast between (the files are written a tensor at a
    time)."""
    elements = max(math.prod(shape) for _, shape in shapes)
    return elements * (4 + 4 + dtype.itemsize)


def export_generated(config: RunConfig, directory: str,
                     max_shard_bytes: int | None = None) -> list[str]:
    """``spmd-moe export``: SPEC §1's generated weights of ``config`` (its seed and dtype)
    as a model directory of the ``spmd`` family (or the config's family), which
    ``--model DIR`` loads back bit-identical. Through the write door
    (files.write_directory): the directory appears whole or not at all; the host memory and
    free disk it needs are checked before anything is written."""
    from ..backend.host import host_memory
    from .weights import WeightSource

    model = config.model
    hf = hf_config(model)
    check_output_directory(directory, "export")
    dtype = storage_dtype(model.dtype)
    listed = list(checkpoint_tensors(model))
    shapes = [(where.name, where.shape) for _, where in listed]
    need = export_memory_bytes(shapes, dtype)
    available, source_of = host_memory(1)
    if need > available:
        raise ConfigError("export", f"writing {directory} needs {need / 2**30:.1f} GiB of host "
                                    f"memory (its largest tensor) but {available / 2**30:.1f} "
                                    f"GiB is available ({source_of})")
    source = WeightSource(model, None, config.seed)   # host arrays only: no backend

    def produce() -> Iterator[tuple[str, np.ndarray]]:
        for ours, where in listed:
            if len(where.shape) == 1:
                array = np.ones(where.shape, dtype=dtype)
            else:
                array = source.host(ours)
                array = array.T if where.transposed else array
            yield where.name, array

    disk = sum(math.prod(shape) for _, shape in shapes) * dtype.itemsize + HEADER_SLACK
    return write_directory(directory, "export", lambda tmp: write_checkpoint(
        tmp, hf, produce(), shapes, dtype, max_shard_bytes), need_bytes=disk)


def describe(checkpoint_dir: str | None, seed: int, init: str) -> str:
    """Where a run's weights come from, in words (the report)."""
    if checkpoint_dir:
        notes = ignored(read_hf_config(checkpoint_dir))
        return f"checkpoint {checkpoint_dir}" + "".join(f"; {note}" for note in notes)
    return (f"generated (SPEC §1 generator, seed {seed})" if init == "host" else
            f"generated on the device (init=device, seed {seed}; not SPEC §1's values)")

