"""Text to token ids and back for ``spmd-moe generate``: a checkpoint's tokenizer.json, read
with the ``tokenizers`` library, and the left padding SPEC §1 expects.

Encoding applies the tokenizer's own post-processor (a BOS token where the checkpoint's
tokenizer adds one), as transformers' fast tokenizers built on the same file do.
"""
from __future__ import annotations

import os

import numpy as np

from ..core.errors import InputError

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """The tokenizer.json of a model directory, read through the read door (a regular file
    of the directory, at most 64 MiB of UTF-8 JSON of bounded depth) and handed to the
    library as text: the file checked is the file parsed."""

    def __init__(self, directory: str):
        from ..core.files import JsonFields, parse_json, read_text

        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.lexists(path):
            raise InputError("--model", f"{directory} has no {TOKENIZER_FILE}: generate "
                                        "needs one (run --input takes token ids instead)")
        from tokenizers import Tokenizer

        text = read_text(path, TOKENIZER_FILE, "tokenizer", inside=directory)
        JsonFields(parse_json(text, path, TOKENIZER_FILE), TOKENIZER_FILE, path).get("model",
                                                                                    "object")
        try:
            self.tokenizer = Tokenizer.from_str(text)
        except Exception as exc:   # the library raises its own Exception type
            raise InputError(TOKENIZER_FILE, f"cannot load {path}: {exc}") from None
        self.path = path

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (special tokens added as the tokenizer says)."""
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens (BOS, EOS, padding) dropped."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of different lengths -> ``ids`` int64 [B, S] and ``mask`` bool [B, S],
    padded on the left (SPEC §1: position S-1 is every sequence's last real token)."""
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq):] = seq
            mask[row, longest - len(seq):] = True
    return ids, mask
