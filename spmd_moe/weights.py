"""Weight generation (SPEC §1): every tensor from its own name-seeded generator, so any
layout and any process count build identical weights without communication.

A rank generates only the tensors it owns (its stage's layers, its experts, the embedding
on the first stage, the LM head on the last) and keeps only its slice of them under TP.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend, storage_dtype
from .config import ModelConfig
from .topology import Grid


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """``rng(name)`` of SPEC §1."""
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


def generate(name: str, shape: tuple[int, ...], scale: float, dtype: str, seed: int) -> np.ndarray:
    """``W(name)`` of SPEC §1, on the host, in the storage dtype."""
    values = tensor_rng(seed, name).standard_normal(shape, dtype=np.float32) * scale
    return values.astype(storage_dtype(dtype))


def tensor_shapes(model: ModelConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """Shape and scale of every generated tensor family (``{l}``/``{e}`` placeholders)."""
    d, f = model.d_model, model.d_ff
    return {
        "embed": ((model.vocab_size, d), 1.0),
        "layers.{l}.wq": ((d, d), d ** -0.5),
        "layers.{l}.wk": ((d, d), d ** -0.5),
        "layers.{l}.wv": ((d, d), d ** -0.5),
        "layers.{l}.wo": ((d, d), d ** -0.5),
        "layers.{l}.router": ((d, model.n_experts), d ** -0.5),
        "layers.{l}.experts.{e}.w1": ((d, f), d ** -0.5),
        "layers.{l}.experts.{e}.w2": ((f, d), f ** -0.5),
        "lm_head": ((d, model.vocab_size), d ** -0.5),
    }


@dataclass
class LayerWeights:
    """One layer as held by one rank. Under TP, ``wq/wk/wv`` are the columns of the rank's
    heads, ``wo`` the matching rows, and each expert's ``w1``/``w2`` the rank's slice of F.
    """

    attn_norm: object   # [d]
    wq: object          # [d, d_local]
    wk: object
    wv: object
    wo: object          # [d_local, d]
    moe_norm: object    # [d]
    router: object      # [d, E]
    experts: dict[int, tuple[object, object]] = field(default_factory=dict)  # e -> (w1, w2)


@dataclass
class ModelWeights:
    """What one rank holds: its stage's layers, plus embed (first stage), final norm and
    LM head (last stage)."""

    layers: dict[int, LayerWeights]
    embed: object | None = None      # [V, d] storage dtype: rows are gathered by token id
    final_norm: object | None = None  # [d]
    lm_head: object | None = None     # [d, V]

    def nbytes(self) -> int:
        arrays = [self.embed, self.final_norm, self.lm_head]
        for lw in self.layers.values():
            arrays += [lw.attn_norm, lw.wq, lw.wk, lw.wv, lw.wo, lw.moe_norm, lw.router]
            for w1, w2 in lw.experts.values():
                arrays += [w1, w2]
        return sum(int(a.nbytes) for a in arrays if a is not None)


class WeightSource:
    """Draws tensors by name: SPEC §1's host generator (``init="host"``) or the backend's
    own generator on the device (``init="device"``: fast at paper size, different values).
    """

    def __init__(self, model: ModelConfig, backend: Backend, seed: int, init: str = "host"):
        self.model, self.backend, self.seed, self.init = model, backend, seed, init
        self.shapes = tensor_shapes(model)

    def _family(self, name: str) -> str:
        parts = name.split(".")
        if parts[0] == "layers":
            parts[1] = "{l}"
            if parts[2] == "experts":
                parts[3] = "{e}"
        return ".".join(parts)

    def host(self, name: str) -> np.ndarray:
        shape, scale = self.shapes[self._family(name)]
        return generate(name, shape, scale, self.model.dtype, self.seed)

    def param(self, name: str, rows: range | None = None, cols: range | None = None):
        """Tensor ``name`` (optionally a row/column block of it) in compute form."""
        if self.init == "device":
            shape, scale = self.shapes[self._family(name)]
            shape = (len(rows) if rows is not None else shape[0],
                     len(cols) if cols is not None else shape[1])
            xp = self.backend.xp
            rng = xp.random.default_rng([self.seed, zlib.crc32(name.encode())])
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            return self.backend.param(values.astype(self.backend.dtype))
        full = self.host(name)
        if rows is not None:
            full = full[rows.start:rows.stop]
        if cols is not None:
            full = full[:, cols.start:cols.stop]
        return self.backend.param(np.ascontiguousarray(full))

    def ones(self):
        return self.backend.param(np.ones(self.model.d_model, dtype=self.backend.dtype))


def build_weights(grid: Grid, backend: Backend, seed: int, init: str = "host") -> ModelWeights:
    """Generate exactly the tensors (and slices) ``grid``'s rank owns."""
    model = grid.model
    src = WeightSource(model, backend, seed, init)
    dh = model.head_dim
    head_cols = range(grid.heads.start * dh, grid.heads.stop * dh)
    ff = grid.ff_columns
    layers = {}
    for layer in grid.layers:
        prefix = f"layers.{layer}"
        lw = LayerWeights(
            attn_norm=src.ones(),
            wq=src.param(f"{prefix}.wq", cols=head_cols),
            wk=src.param(f"{prefix}.wk", cols=head_cols),
            wv=src.param(f"{prefix}.wv", cols=head_cols),
            wo=src.param(f"{prefix}.wo", rows=head_cols),
            moe_norm=src.ones(),
            router=src.param(f"{prefix}.router"))
        for expert in grid.experts:
            lw.experts[expert] = (src.param(f"{prefix}.experts.{expert}.w1", cols=ff),
                                  src.param(f"{prefix}.experts.{expert}.w2", rows=ff))
        layers[layer] = lw
    weights = ModelWeights(layers)
    if grid.is_first_stage:
        # Rows are gathered by token id, never multiplied: keep the storage dtype.
        embed = src.host("embed") if init == "host" else src.param("embed")
        weights.embed = backend.asarray(embed, backend.dtype)
    if grid.is_last_stage:
        weights.final_norm = src.ones()
        weights.lm_head = src.param("lm_head")
    return weights
