"""The tiny Hugging Face checkpoints of tests/data/hf (made by bin/make-hf-fixtures with
transformers' own classes) and transformers' outputs on them, for the serial and the MPI
suites."""
from __future__ import annotations

import os

import numpy as np

from spmd_moe.model.checkpoint import checkpoint_run_config, eos_token_ids
from spmd_moe.model.inputs import validate_batch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf")
# float32 checkpoints, one per family (DeepSeek-V3 twice: MLA with a low-rank query,
# interleaved RoPE and expert groups; one query projection, YaRN, one group)
FLOAT32 = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "deepseek_v3_yarn")
BF16 = "mixtral_bf16"                         # a sharded bfloat16 checkpoint
FP8 = "deepseek_v3_fp8"                       # DeepSeek's FP8 blocks, bfloat16 elsewhere
# The checkpoints stored in another dtype than float32: expected.npz has transformers'
# float32 run of the same (dequantised) weights as logits_float32 and tokens_float32.
LOW_PRECISION = (BF16, FP8)
NEW_TOKENS = 6                                # generate()'s max_new_tokens


def path(name: str) -> str:
    return os.path.join(ROOT, name)


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(path(name), "expected.npz")) as data:
        return {key: data[key] for key in data.files}


def float32_expected(name: str, want: dict) -> tuple[np.ndarray, np.ndarray]:
    """(logits, tokens) of transformers' float32 run of checkpoint ``name``."""
    suffix = "_float32" if name in LOW_PRECISION else ""
    return want["logits" + suffix], want["tokens" + suffix]


def setup(name: str, dtype: str | None = None, decode: bool = False):
    """(RunConfig from the checkpoint, its left-padded Batch, expected outputs, EOS ids)."""
    want = expected(name)
    sets = ["workload=decode", f"new_tokens={NEW_TOKENS}"] if decode else []
    config = checkpoint_run_config(path(name), sets, dtype=dtype)
    batch = validate_batch(want["ids"], want["mask"], config.model,
                           NEW_TOKENS if decode else 0)
    return config, batch, want, eos_token_ids(path(name))
