"""Weight generation (SPEC §1): every tensor from its own name-seeded generator, so any
layout and any process count build identical weights without communication.

A rank generates only the tensors it owns (its stage's layers, its experts, the embedding
on the first stage, the LM head on the last) and keeps only its slice of them under TP.
:func:`build_weights` assembles a rank's share from any source with the same three methods
(``param``, ``gain``, ``embedding``): the generator here, or a checkpoint (checkpoint.py).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from ..backend.array import Backend, storage_dtype
from ..core.config import ModelConfig
from ..core.topology import Grid


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """``rng(name)`` of SPEC §1."""
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


def generate(name: str, shape: tuple[int, ...], scale: float, dtype: str, seed: int) -> np.ndarray:
    """``W(name)`` of SPEC §1, on the host, in the storage dtype."""
    values = tensor_rng(seed, name).standard_normal(shape, dtype=np.float32) * scale
    return values.astype(storage_dtype(dtype))


def tensor_shapes(model: ModelConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """Shape and scale of every generated matrix family (``{l}``/``{e}`` placeholders), in
    our ``[in, out]`` layout (``y = x W``). For SPEC §1's model these are SPEC §1's; a
    family's shapes add grouped K/V (``[d, H_kv*Dh]``), a head dim other than d/H and W3,
    each scaled by its fan-in as SPEC §1 scales its own."""
    d, f = model.d_model, model.d_ff
    q_width, kv_width = model.q_width, model.kv_width
    shapes = {
        "embed": ((model.vocab_size, d), 1.0),
        "layers.{l}.wq": ((d, q_width), d ** -0.5),
        "layers.{l}.wk": ((d, kv_width), d ** -0.5),
        "layers.{l}.wv": ((d, kv_width), d ** -0.5),
        "layers.{l}.wo": ((q_width, d), q_width ** -0.5),
        "layers.{l}.router": ((d, model.n_experts), d ** -0.5),
        "layers.{l}.experts.{e}.w1": ((d, f), d ** -0.5),
        "layers.{l}.experts.{e}.w2": ((f, d), f ** -0.5),
        "lm_head": ((d, model.vocab_size), d ** -0.5),
    }
    if model.activation == "swiglu":
        shapes["layers.{l}.experts.{e}.w3"] = ((d, f), d ** -0.5)
    return shapes


def gain_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every norm gain (ones in SPEC §1; a checkpoint's own values otherwise)."""
    d = model.d_model
    shapes = {"layers.{l}.attn_norm": (d,), "layers.{l}.moe_norm": (d,), "final_norm": (d,)}
    if model.qk_norm == "head":
        shapes["layers.{l}.q_norm"] = (model.head_dim,)
        shapes["layers.{l}.k_norm"] = (model.head_dim,)
    elif model.qk_norm == "full":
        shapes["layers.{l}.q_norm"] = (model.q_width,)
        shapes["layers.{l}.k_norm"] = (model.kv_width,)
    return shapes


def tensor_family(name: str) -> str:
    """``layers.3.experts.7.w1`` -> ``layers.{l}.experts.{e}.w1`` (the key of the tables)."""
    parts = name.split(".")
    if parts[0] == "layers":
        parts[1] = "{l}"
        if parts[2] == "experts":
            parts[3] = "{e}"
    return ".".join(parts)


@dataclass
class LayerWeights:
    """One layer as held by one rank (compute form, see Backend.param). Under TP, ``wq``
    holds the columns of the rank's query heads, ``wk``/``wv`` those of the key/value heads
    they use, ``wo`` the rows matching ``wq``, and each expert its slice of F.
    """

    attn_norm: object   # [d]
    wq: object          # [d, h*Dh]
    wk: object          # [d, hk*Dh]
    wv: object          # [d, hk*Dh]
    wo: object          # [h*Dh, d]
    moe_norm: object    # [d]
    router: object      # [d, E]
    # e -> (w1 [d, F], w2 [F, d]) or, SwiGLU, (w1, w2, w3 [d, F])
    experts: dict[int, tuple] = field(default_factory=dict)
    q_norm: object | None = None   # [Dh] (per head) or [h*Dh] (whole projection)
    k_norm: object | None = None   # [Dh] or [hk*Dh]


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
            arrays += [lw.attn_norm, lw.wq, lw.wk, lw.wv, lw.wo, lw.moe_norm, lw.router,
                       lw.q_norm, lw.k_norm]
            for matrices in lw.experts.values():
                arrays += list(matrices)
        return sum(int(a.nbytes) for a in arrays if a is not None)


class WeightSource:
    """Draws tensors by name: SPEC §1's host generator (``init="host"``) or the backend's
    own generator on the device (``init="device"``: fast at paper size, different values).
    Norm gains are ones. With ``tie_word_embeddings`` the LM head is the embedding's
    transpose. checkpoint.CheckpointSource offers the same three methods."""

    def __init__(self, model: ModelConfig, backend: Backend, seed: int, init: str = "host"):
        self.model, self.backend, self.seed, self.init = model, backend, seed, init
        self.shapes = tensor_shapes(model)
        self.gains = gain_shapes(model)

    def host(self, name: str) -> np.ndarray:
        shape, scale = self.shapes[tensor_family(name)]
        return generate(name, shape, scale, self.model.dtype, self.seed)

    def param(self, name: str, rows: range | None = None, cols: range | None = None):
        """Matrix ``name`` (optionally a row/column block of it) in compute form."""
        if name == "lm_head" and self.model.tie_word_embeddings:
            full = self.embedding_host().T                                     # [d, V]
        elif self.init == "device":
            shape, scale = self.shapes[tensor_family(name)]
            shape = (len(rows) if rows is not None else shape[0],
                     len(cols) if cols is not None else shape[1])
            xp = self.backend.xp
            rng = xp.random.default_rng([self.seed, zlib.crc32(name.encode())])
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            return self.backend.param(values.astype(self.backend.dtype))
        else:
            full = self.host(name)
        if rows is not None:
            full = full[rows.start:rows.stop]
        if cols is not None:
            full = full[:, cols.start:cols.stop]
        return self.backend.param(np.ascontiguousarray(full))

    def gain(self, name: str, cols: range | None = None):
        """Norm gain ``name`` (or the block ``cols`` of it) in compute form: ones."""
        (width,) = self.gains[tensor_family(name)]
        width = len(cols) if cols is not None else width
        return self.backend.param(np.ones(width, dtype=self.backend.dtype))

    def embedding_host(self) -> np.ndarray:
        return self.host("embed")

    def embedding(self):
        """The [V, d] table in the storage dtype (rows are gathered, never multiplied)."""
        if self.init == "device":
            return self.param("embed").astype(self.backend.dtype)
        return self.backend.asarray(self.host("embed"), self.backend.dtype)


def build_weights(grid: Grid, backend: Backend, seed: int = 0, init: str = "host",
                  source=None, progress=None) -> ModelWeights:
    """Exactly the tensors (and slices) ``grid``'s rank owns, from ``source`` (a
    checkpoint.CheckpointSource) or, by default, SPEC §1's generator. ``progress``
    (progress.Progress): updated per layer and expert, of ``layers x (experts + 1)``."""
    model = grid.model
    src = source if source is not None else WeightSource(model, backend, seed, init)
    dh = model.head_dim
    q_cols = range(grid.heads.start * dh, grid.heads.stop * dh)
    kv_cols = range(grid.kv_heads.start * dh, grid.kv_heads.stop * dh)
    ff = grid.ff_columns
    layers = {}
    per_layer = len(grid.experts) + 1
    for index, layer in enumerate(grid.layers):
        prefix = f"layers.{layer}"
        lw = LayerWeights(
            attn_norm=src.gain(f"{prefix}.attn_norm"),
            wq=src.param(f"{prefix}.wq", cols=q_cols),
            wk=src.param(f"{prefix}.wk", cols=kv_cols),
            wv=src.param(f"{prefix}.wv", cols=kv_cols),
            wo=src.param(f"{prefix}.wo", rows=q_cols),
            moe_norm=src.gain(f"{prefix}.moe_norm"),
            router=src.param(f"{prefix}.router"))
        if model.qk_norm == "head":
            lw.q_norm, lw.k_norm = src.gain(f"{prefix}.q_norm"), src.gain(f"{prefix}.k_norm")
        elif model.qk_norm == "full":
            lw.q_norm = src.gain(f"{prefix}.q_norm", cols=q_cols)
            lw.k_norm = src.gain(f"{prefix}.k_norm", cols=kv_cols)
        for expert in grid.experts:
            name = f"{prefix}.experts.{expert}"
            matrices = (src.param(f"{name}.w1", cols=ff), src.param(f"{name}.w2", rows=ff))
            if model.activation == "swiglu":
                matrices += (src.param(f"{name}.w3", cols=ff),)
            lw.experts[expert] = matrices
            if progress is not None:
                progress.update(index * per_layer + expert - grid.experts.start + 2,
                                f"layer {layer}")
        layers[layer] = lw
    weights = ModelWeights(layers)
    if grid.is_first_stage:
        weights.embed = src.embedding()
    if grid.is_last_stage:
        weights.final_norm = src.gain("final_norm")
        weights.lm_head = src.param("lm_head")
    return weights
