"""The tiny Hugging Face checkpoints of tests/data/hf (made by bin/make-hf-fixtures with
transformers' own classes) and transformers' outputs on them, for the serial and the MPI
suites."""
from __future__ import annotations

import os

import numpy as np

from spmd_moe.model.checkpoint import checkpoint_run_config, eos_token_ids
from spmd_moe.model.inputs import validate_batch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf")
FLOAT32 = ("mixtral", "qwen3_moe", "olmoe")   # float32 checkpoints, one per family
BF16 = "mixtral_bf16"                         # a sharded bfloat16 checkpoint
NEW_TOKENS = 6                                # generate()'s max_new_tokens


def path(name: str) -> str:
    return os.path.join(ROOT, name)


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(path(name), "expected.npz")) as data:
        return {key: data[key] for key in data.files}


def setup(name: str, dtype: str | None = None, decode: bool = False):
    """(RunConfig from the checkpoint, its left-padded Batch, expected outputs, EOS ids)."""
    want = expected(name)
    sets = ["workload=decode", f"new_tokens={NEW_TOKENS}"] if decode else []
    config = checkpoint_run_config(path(name), sets, dtype=dtype)
    batch = validate_batch(want["ids"], want["mask"], config.model,
                           NEW_TOKENS if decode else 0)
    return config, batch, want, eos_token_ids(path(name))
