"""Weight generation (SPEC §1): every tensor from its own name-seeded generator, so any
layout and any process count build identical weights without communication.

A rank generates only the tensors it owns (its stage's layers, its experts, the embedding
on the first stage, the LM head on the last) and keeps only its slice of them under TP.
:func:`build_weights` assembles a rank's share from any source with the same three methods
(``param``, ``gain``, ``embedding``): the generator here, or a checkpoint (checkpoint.py).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field, fields

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


def _swiglu_shapes(prefix: str, d: int, width: int) -> dict:
    """A SwiGLU MLP's W1 (gate), W2 (down) and W3 (up), ``[in, out]``, fan-in scaled."""
    return {f"{prefix}.w1": ((d, width), d ** -0.5), f"{prefix}.w2": ((width, d), width ** -0.5),
            f"{prefix}.w3": ((d, width), d ** -0.5)}


def tensor_shapes(model: ModelConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """Shape and scale of every generated matrix family (``{l}``/``{e}`` placeholders), in
    our ``[in, out]`` layout (``y = x W``). For SPEC §1's model these are SPEC §1's; a
    family's shapes add grouped K/V (``[d, H_kv*Dh]``), a head dim other than d/H, W3,
    MLA's low-rank projections, shared experts and dense MLPs, each scaled by its fan-in
    as SPEC §1 scales its own."""
    d, f = model.d_model, model.d_ff
    q_width, kv_width, o_width = model.q_width, model.kv_width, model.o_width
    shapes = {"embed": ((model.vocab_size, d), 1.0)}
    if model.attention == "mla":
        latent, rank = model.kv_lora_rank, model.q_lora_rank
        if rank:
            shapes["layers.{l}.wq_a"] = ((d, rank), d ** -0.5)
            shapes["layers.{l}.wq_b"] = ((rank, q_width), rank ** -0.5)
        else:
            shapes["layers.{l}.wq"] = ((d, q_width), d ** -0.5)
        shapes["layers.{l}.wkv_a"] = ((d, latent + model.rope_width), d ** -0.5)
        shapes["layers.{l}.wkv_b"] = ((latent, model.n_heads * (model.nope_dim + model.v_dim)),
                                      latent ** -0.5)
    else:
        shapes["layers.{l}.wq"] = ((d, q_width), d ** -0.5)
        shapes["layers.{l}.wk"] = ((d, kv_width), d ** -0.5)
        shapes["layers.{l}.wv"] = ((d, kv_width), d ** -0.5)
    shapes.update({
        "layers.{l}.wo": ((o_width, d), o_width ** -0.5),
        "layers.{l}.router": ((d, model.n_experts), d ** -0.5),
        "layers.{l}.experts.{e}.w1": ((d, f), d ** -0.5),
        "layers.{l}.experts.{e}.w2": ((f, d), f ** -0.5),
        "lm_head": ((d, model.vocab_size), d ** -0.5),
    })
    if model.activation == "swiglu":
        shapes["layers.{l}.experts.{e}.w3"] = ((d, f), d ** -0.5)
    if model.d_shared:
        shapes.update(_swiglu_shapes("layers.{l}.shared", d, model.d_shared))
    if model.shared_gate:
        shapes["layers.{l}.shared_gate"] = ((d, 1), d ** -0.5)
    if model.dense_layers:
        shapes.update(_swiglu_shapes("layers.{l}.mlp", d, model.d_ff_dense))
    return shapes


# 1-D tensors drawn by the generator (scale 0.1) rather than ones: biases.
BIASES = ("layers.{l}.bq", "layers.{l}.bk", "layers.{l}.bv", "layers.{l}.router_bias")


def gain_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every 1-D tensor: norm gains (ones in SPEC §1; a checkpoint's own values
    otherwise) and biases (:data:`BIASES`)."""
    d = model.d_model
    shapes = {"layers.{l}.attn_norm": (d,), "layers.{l}.moe_norm": (d,), "final_norm": (d,)}
    if model.qk_norm == "head":
        shapes["layers.{l}.q_norm"] = (model.head_dim,)
        shapes["layers.{l}.k_norm"] = (model.head_dim,)
    elif model.qk_norm == "full":
        shapes["layers.{l}.q_norm"] = (model.q_width,)
        shapes["layers.{l}.k_norm"] = (model.kv_width,)
    if model.qkv_bias:
        shapes.update({"layers.{l}.bq": (model.q_width,), "layers.{l}.bk": (model.kv_width,),
                       "layers.{l}.bv": (model.kv_width,)})
    if model.attention == "mla":
        if model.q_lora_rank:
            shapes["layers.{l}.q_a_norm"] = (model.q_lora_rank,)
        shapes["layers.{l}.kv_a_norm"] = (model.kv_lora_rank,)
    if model.router_bias:
        shapes["layers.{l}.router_bias"] = (model.n_experts,)
    return shapes


# What a dense layer holds instead of its router, experts and shared experts.
_MOE_ONLY = ("router", "router_bias", "shared.", "shared_gate", "experts.")


def layer_keys(model: ModelConfig, layer: int) -> tuple[list[str], list[str]]:
    """The tensor families (``layers.{l}...``) of ``layer``: (per layer, per expert). A
    dense layer has its MLP and no router or experts; a MoE layer the reverse."""
    keys = [k for k in list(tensor_shapes(model)) + list(gain_shapes(model))
            if k.startswith("layers.")]
    dropped = _MOE_ONLY if model.is_dense(layer) else ("mlp.",)
    keys = [k for k in keys if not k.split(".", 2)[2].startswith(dropped)]
    return ([k for k in keys if ".experts." not in k],
            [k for k in keys if ".experts." in k])


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
    they use, ``wo`` the rows matching its heads' outputs, each expert (and the shared
    expert, the dense MLP) its slice of F. Which fields are set depends on the model:
    multi-head attention (``wq``, ``wk``, ``wv``, biases, q/k norms) or MLA (``wq`` or
    ``wq_a``/``q_a_norm``/``wq_b``, ``wkv_a``, ``kv_a_norm``, ``wkv_b``); a MoE layer
    (router, experts, shared expert) or a dense one (``mlp``).
    """

    attn_norm: object   # [d]
    moe_norm: object    # [d]
    wo: object          # [h*Dv, d]
    wq: object | None = None          # [d, h*Dh]
    wk: object | None = None          # [d, hk*Dh]
    wv: object | None = None          # [d, hk*Dh]
    bq: object | None = None          # [h*Dh] (float32 adds: see blocks.linear)
    bk: object | None = None          # [hk*Dh]
    bv: object | None = None          # [hk*Dh]
    q_norm: object | None = None      # [Dh] (per head) or [h*Dh] (whole projection)
    k_norm: object | None = None      # [Dh] or [hk*Dh]
    wq_a: object | None = None        # MLA: [d, q_lora]
    q_a_norm: object | None = None    # [q_lora]
    wq_b: object | None = None        # [q_lora, h*Dh]
    wkv_a: object | None = None       # [d, c + rope]
    kv_a_norm: object | None = None   # [c]
    wkv_b: object | None = None       # [c, h*(nope + Dv)]
    router: object | None = None      # [d, E]
    router_bias: object | None = None  # float32 [E]: selection only (DeepSeek)
    # e -> (w1 [d, F], w2 [F, d]) or, SwiGLU, (w1, w2, w3 [d, F])
    experts: dict[int, tuple] = field(default_factory=dict)
    shared: tuple | None = None       # (w1 [d, Fs], w2 [Fs, d], w3 [d, Fs])
    shared_gate: object | None = None  # [d, 1]
    mlp: tuple | None = None          # a dense layer's (w1, w2, w3)


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
            for item in fields(lw):
                value = getattr(lw, item.name)
                if isinstance(value, dict):
                    arrays += [m for matrices in value.values() for m in matrices]
                elif isinstance(value, tuple):
                    arrays += list(value)
                else:
                    arrays.append(value)
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

    def gain(self, name: str, cols: range | None = None, float32: bool = False):
        """1-D tensor ``name`` (or the block ``cols`` of it) in compute form (``float32``:
        as float32 whatever the run's dtype): norm gains are ones, biases drawn (scale
        0.1, from ``rng(name)`` as every tensor)."""
        (width,) = self.gains[tensor_family(name)]
        if tensor_family(name) in BIASES:
            values = generate(name, (width,), 0.1, "float32" if float32 else self.model.dtype,
                              self.seed)
        else:
            values = np.ones(width, dtype=np.float32 if float32 else self.backend.dtype)
        if cols is not None:
            values = values[cols.start:cols.stop]
        return (self.backend.asarray(np.ascontiguousarray(values)) if float32
                else self.backend.param(np.ascontiguousarray(values)))

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
    layers = {}
    per_layer = len(grid.experts) + 1
    for index, layer in enumerate(grid.layers):
        prefix = f"layers.{layer}"
        lw = LayerWeights(attn_norm=src.gain(f"{prefix}.attn_norm"),
                          moe_norm=src.gain(f"{prefix}.moe_norm"),
                          wo=src.param(f"{prefix}.wo", rows=_head_columns(grid, model.v_dim)))
        _attention_weights(src, grid, prefix, lw)
        if model.is_dense(layer):
            lw.mlp = _swiglu(src, f"{prefix}.mlp", grid.tp_slice(model.d_ff_dense))
        else:
            lw.router = src.param(f"{prefix}.router")
            if model.router_bias:
                lw.router_bias = src.gain(f"{prefix}.router_bias", float32=True)
            if model.d_shared:
                lw.shared = _swiglu(src, f"{prefix}.shared", grid.tp_slice(model.d_shared))
            if model.shared_gate:
                lw.shared_gate = src.param(f"{prefix}.shared_gate")
            ff = grid.ff_columns
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


def _head_columns(grid: Grid, width: int) -> range:
    """Columns of this rank's query heads in a projection of ``width`` per head."""
    return range(grid.heads.start * width, grid.heads.stop * width)


def _attention_weights(src, grid: Grid, prefix: str, lw: LayerWeights) -> None:
    """The attention tensors of one layer into ``lw``: multi-head (q/k/v, their biases
    and norms) or MLA (the low-rank projections; the latent's are whole on every rank, the
    per-head ones sliced under TP)."""
    model = grid.model
    q_cols = _head_columns(grid, model.head_dim)
    if model.attention == "mla":
        if model.q_lora_rank:
            lw.wq_a = src.param(f"{prefix}.wq_a")
            lw.q_a_norm = src.gain(f"{prefix}.q_a_norm")
            lw.wq_b = src.param(f"{prefix}.wq_b", cols=q_cols)
        else:
            lw.wq = src.param(f"{prefix}.wq", cols=q_cols)
        lw.wkv_a = src.param(f"{prefix}.wkv_a")
        lw.kv_a_norm = src.gain(f"{prefix}.kv_a_norm")
        lw.wkv_b = src.param(f"{prefix}.wkv_b",
                             cols=_head_columns(grid, model.nope_dim + model.v_dim))
        return
    dh = model.head_dim
    kv_cols = range(grid.kv_heads.start * dh, grid.kv_heads.stop * dh)
    lw.wq = src.param(f"{prefix}.wq", cols=q_cols)
    lw.wk = src.param(f"{prefix}.wk", cols=kv_cols)
    lw.wv = src.param(f"{prefix}.wv", cols=kv_cols)
    if model.qkv_bias:
        lw.bq, lw.bk, lw.bv = (src.gain(f"{prefix}.b{x}", cols=cols, float32=True)
                               for x, cols in (("q", q_cols), ("k", kv_cols), ("v", kv_cols)))
    if model.qk_norm == "head":
        lw.q_norm, lw.k_norm = src.gain(f"{prefix}.q_norm"), src.gain(f"{prefix}.k_norm")
    elif model.qk_norm == "full":
        lw.q_norm = src.gain(f"{prefix}.q_norm", cols=q_cols)
        lw.k_norm = src.gain(f"{prefix}.k_norm", cols=kv_cols)


def _swiglu(src, prefix: str, ff: range) -> tuple:
    """A SwiGLU MLP's (w1, w2, w3), this rank's F slice ``ff`` of it."""
    return (src.param(f"{prefix}.w1", cols=ff), src.param(f"{prefix}.w2", rows=ff),
            src.param(f"{prefix}.w3", cols=ff))
