"""Checkpoints (SPEC §8) on one rank: the safetensors reader against the safetensors package,
each family against transformers' own outputs on tiny random checkpoints, bfloat16 loaded
bit for bit, each rank reading only its share, bad checkpoints refused naming tensor and
file, unimplemented config fields refused naming the field, and SPEC §1's model exported
and loaded back bit-identical. (tests/mpi/test_checkpoint_mpi.py: the same at 2-4 ranks.)"""
import json
import os
import shutil

import hf_fixtures as hf
import numpy as np
import pytest
from mpi4py import MPI

from spmd_moe.backend.array import BF16, Backend, BackendChoice, choose_backend
from spmd_moe.core.config import Layout, build_run_config
from spmd_moe.core.errors import ConfigError, InputError
from spmd_moe.core.topology import Grid
from spmd_moe.engine.testing import TOLERANCE, relative_error, run_layout
from spmd_moe.model.checkpoint import (Checkpoint, checkpoint_run_config, eos_token_ids,
                                       export_generated, load_weights, open_checkpoint,
                                       read_header)
from spmd_moe.model.families import checkpoint_tensors, model_config_from_hf
from spmd_moe.model.inputs import synthetic_input
from spmd_moe.model.tokenizer import TextTokenizer, left_pad

WORLD = MPI.COMM_WORLD


# The safetensors package is the reference, imported where used: collecting this module must
# not fail where it is missing (bin/gpu-check's image); those tests then skip.
def safe_open(*args, **kwargs):
    return pytest.importorskip("safetensors").safe_open(*args, **kwargs)


def save_file(*args, **kwargs):
    return pytest.importorskip("safetensors.numpy").save_file(*args, **kwargs)


def backend(dtype: str) -> Backend:
    return Backend(BackendChoice("numpy", "test"), dtype)


def files_of(name: str) -> list[str]:
    return sorted(f for f in os.listdir(hf.path(name)) if f.endswith(".safetensors"))


# --- the reader ------------------------------------------------------------------------

@pytest.mark.parametrize("name", hf.FLOAT32 + (hf.BF16,))
def test_reader_agrees_with_the_safetensors_package(name):
    checkpoint = Checkpoint(hf.path(name))
    seen = set()
    for file_name in files_of(name):
        file_path = os.path.join(hf.path(name), file_name)
        header = read_header(file_path)
        with safe_open(file_path, "numpy") as theirs:
            assert sorted(header) == sorted(theirs.keys())
            for tensor, entry in header.items():
                want = theirs.get_tensor(tensor)
                assert entry.shape == want.shape
                got = checkpoint.read(tensor)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert got.tobytes() == want.tobytes(), tensor     # bit for bit, bf16 too
                block = checkpoint.read(tensor, range(1, 2)) if got.ndim == 2 else None
                if block is not None:
                    assert block.tobytes() == want[1:2].tobytes()
        seen |= set(header)
    assert seen == set(checkpoint.tensors)
    assert checkpoint.stats.bytes_read > 0 and checkpoint.stats.files == set(files_of(name))


# --- families ----------------------------------------------------------------------------

def test_each_family_reads_its_config():
    mixtral = checkpoint_run_config(hf.path("mixtral")).model
    assert (mixtral.family, mixtral.kv_heads, mixtral.head_dim, mixtral.activation,
            mixtral.qk_norm, mixtral.router_renorm, mixtral.rope_theta, mixtral.dtype) == (
        "mixtral", 2, 4, "swiglu", "none", True, 1e6, "float32")
    qwen = checkpoint_run_config(hf.path("qwen3_moe")).model
    # head_dim 6 != 16/4; experts of moe_intermediate_size (8), not intermediate_size (32)
    assert (qwen.family, qwen.head_dim, qwen.q_width, qwen.d_ff, qwen.n_experts, qwen.top_k,
            qwen.qk_norm, qwen.router_renorm, qwen.tie_word_embeddings, qwen.norm_eps) == (
        "qwen3_moe", 6, 24, 8, 8, 3, "head", True, True, 1e-6)
    olmoe = checkpoint_run_config(hf.path("olmoe")).model
    assert (olmoe.family, olmoe.qk_norm, olmoe.router_renorm, olmoe.kv_width) == (
        "olmoe", "full", False, 8)
    assert checkpoint_run_config(hf.path(hf.BF16)).model.dtype == "bfloat16"
    assert checkpoint_run_config(hf.path(hf.BF16), dtype="float32").model.dtype == "float32"


def mixtral_config(**changes) -> dict:
    with open(os.path.join(hf.path("mixtral"), "config.json")) as handle:
        data = json.load(handle)
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def test_rope_theta_from_either_key():
    params = {"rope_type": "default", "rope_theta": 5e5}
    assert model_config_from_hf(mixtral_config(rope_parameters=params)).rope_theta == 5e5
    assert model_config_from_hf(mixtral_config(rope_parameters=..., rope_theta=2e4)
                                ).rope_theta == 2e4


REFUSED = {
    "rope scaling": (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                           "factor": 4.0}), "rope_parameters.rope_type"),
    "old rope_scaling": (dict(rope_scaling={"type": "linear", "factor": 2.0}),
                         "rope_scaling.rope_type"),
    "partial rotary": (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "sliding window": (dict(sliding_window=4096), "config.json sliding_window: 4096"),
    "attention bias": (dict(attention_bias=True), "config.json attention_bias"),
    "mlp bias": (dict(mlp_bias=True), "config.json mlp_bias"),
    "clip_qkv": (dict(clip_qkv=8.0), "config.json clip_qkv"),
    "dense layers": (dict(mlp_only_layers=[0]), "config.json mlp_only_layers"),
    "sparse step": (dict(decoder_sparse_step=2), "config.json decoder_sparse_step"),
    "shared experts": (dict(shared_expert_intermediate_size=64),
                       "config.json shared_expert_intermediate_size"),
    "activation": (dict(hidden_act="gelu"), "config.json hidden_act: 'gelu'"),
    "architecture": (dict(architectures=["LlamaForCausalLM"]), "config.json architectures"),
    "quantised": (dict(quantization_config={"quant_method": "fp8"}),
                  "config.json quantization_config"),
    "float16 without --dtype": (dict(dtype="float16"), "config.json dtype: float16"),
    "sliding layers": (dict(layer_types=["full_attention", "sliding_attention"]),
                       "config.json layer_types"),
    "bad kv heads": (dict(num_key_value_heads=3), "config.json num_key_value_heads: 3"),
    "missing field": (dict(num_hidden_layers=...), "config.json num_hidden_layers: missing"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unimplemented_config_fields_are_refused_by_name(case):
    changes, message = REFUSED[case]
    with pytest.raises(ConfigError) as info:
        model_config_from_hf(mixtral_config(**changes))
    assert message in str(info.value)


def test_qwen3_sliding_window_only_counts_when_used():
    with open(os.path.join(hf.path("qwen3_moe"), "config.json")) as handle:
        data = json.load(handle)
    assert model_config_from_hf({**data, "sliding_window": 4096, "use_sliding_window": False})
    with pytest.raises(ConfigError, match="sliding_window"):
        model_config_from_hf({**data, "sliding_window": 4096, "use_sliding_window": True})


def test_model_fields_cannot_be_overridden_under_model():
    with pytest.raises(ConfigError, match="--set n_layers: fixed by"):
        checkpoint_run_config(hf.path("mixtral"), ["n_layers=2"])
    with pytest.raises(ConfigError, match="--set hidden_size: fixed by"):
        checkpoint_run_config(hf.path("mixtral"), ["hidden_size=8"])
    with pytest.raises(ConfigError, match="--init"):
        checkpoint_run_config(hf.path("mixtral"), init="device")
    config = checkpoint_run_config(hf.path("mixtral"), ["batch_size=3", "max_seq_len=32"],
                                   dtype="bf16")
    assert (config.workload.batch_size, config.model.max_seq_len, config.model.dtype) == (
        3, 32, "bfloat16")


def test_eos_ids_come_from_generation_config_then_config(tmp_path):
    assert eos_token_ids(hf.path("mixtral")) == [2, 27]          # a list
    assert eos_token_ids(hf.path("olmoe")) == [2]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert eos_token_ids(str(tmp_path)) == [7]
    (tmp_path / "config.json").write_text("{}")
    assert eos_token_ids(str(tmp_path)) == []


def test_tokenizer_gives_the_fixture_ids():
    want = hf.expected("mixtral")
    tokenizer = TextTokenizer(hf.path("mixtral"))
    ids, mask = left_pad(tokenizer.encode([str(p) for p in want["prompts"]]))
    assert np.array_equal(ids, want["ids"]) and np.array_equal(mask, want["mask"] == 1)
    assert tokenizer.decode(tokenizer.encode(["a small model"])[0]) == "a small model"


# --- against transformers ----------------------------------------------------------------

@pytest.mark.parametrize("name", hf.FLOAT32)
def test_one_rank_matches_transformers(name):
    config, batch, want, eos = hf.setup(name, decode=True)
    prefill = run_layout(WORLD, config, batch)
    assert relative_error(prefill["logits"], want["logits"]) < 1e-4
    decode = run_layout(WORLD, config, batch, decode_tokens=hf.NEW_TOKENS, eos_id=eos)
    assert np.array_equal(decode["tokens"], want["tokens"]), (decode["tokens"], want["tokens"])


def test_bfloat16_checkpoint_loads_bit_for_bit():
    config, _, _, _ = hf.setup(hf.BF16, dtype="bfloat16")
    model = config.model
    bk = backend("bfloat16")
    checkpoint = open_checkpoint(hf.path(hf.BF16), model)
    weights = load_weights(Grid(Layout(), model, 0), bk, checkpoint)
    theirs = {}
    for file_name in files_of(hf.BF16):
        with safe_open(os.path.join(hf.path(hf.BF16), file_name), "numpy") as handle:
            theirs.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert all(t.dtype == BF16 for t in theirs.values())
    prefix = "model.layers.1"
    pairs = [
        (weights.embed, theirs["model.embed_tokens.weight"]),
        (weights.lm_head, theirs["lm_head.weight"].T),
        (weights.final_norm, theirs["model.norm.weight"]),
        (weights.layers[1].wk, theirs[f"{prefix}.self_attn.k_proj.weight"].T),
        (weights.layers[1].wo, theirs[f"{prefix}.self_attn.o_proj.weight"].T),
        (weights.layers[1].router, theirs[f"{prefix}.block_sparse_moe.gate.weight"].T),
        (weights.layers[1].attn_norm, theirs[f"{prefix}.input_layernorm.weight"]),
    ]
    for index, matrix in enumerate(("w1", "w2", "w3")):
        pairs.append((weights.layers[1].experts[5][index],
                      theirs[f"{prefix}.block_sparse_moe.experts.5.{matrix}.weight"].T))
    for ours, want in pairs:
        # NumPy keeps matrices as float32 holding the bf16 values: compare those exactly.
        assert np.array_equal(np.asarray(ours, dtype=np.float32), want.astype(np.float32))
    assert weights.embed.dtype == BF16


def test_bfloat16_checkpoint_matches_transformers():
    # float32 arithmetic on the bf16 weights: as tight as the float32 fixtures.
    config, batch, want, eos = hf.setup(hf.BF16, dtype="float32", decode=True)
    assert relative_error(run_layout(WORLD, config, batch)["logits"],
                          want["logits_float32"]) < 1e-4
    decode = run_layout(WORLD, config, batch, decode_tokens=hf.NEW_TOKENS, eos_id=eos)
    assert np.array_equal(decode["tokens"], want["tokens_float32"])
    # bf16 arithmetic in both: they round at different points (transformers rounds every
    # op's output), so only the bf16 tolerance holds.
    config, batch, want, _ = hf.setup(hf.BF16)
    assert relative_error(run_layout(WORLD, config, batch)["logits"], want["logits"]) < 3e-2


# --- rank-local loading ------------------------------------------------------------------

def owned_bytes(model, grid: Grid, checkpoint: Checkpoint) -> int:
    """What grid's rank must read under expert parallelism: its stage's layers (attention,
    norms, router, its experts), the embedding on the first stage, final norm and LM head on
    the last (the embedding again when tied)."""
    total = 0
    for ours, where in checkpoint_tensors(model):
        entry = checkpoint.tensors[where.name]
        parts = ours.split(".")
        if parts[0] == "layers":
            mine = int(parts[1]) in grid.layers and (
                parts[2] != "experts" or int(parts[3]) in grid.experts)
        else:
            mine = grid.is_first_stage if ours == "embed" else grid.is_last_stage
        total += (entry.end - entry.begin) if mine else 0
    if model.tie_word_embeddings and grid.is_last_stage:
        total += checkpoint.tensors["model.embed_tokens.weight"].end - \
            checkpoint.tensors["model.embed_tokens.weight"].begin
    return total


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("layout", ["ep=2,pp=2", "ep=4,pp=1", "ep=1,pp=3"])
def test_each_rank_reads_only_its_share(name, layout):
    config = checkpoint_run_config(hf.path(name))
    model = config.model
    parsed = Layout.parse(layout, 4 if "pp=3" not in layout else 3)
    parsed.validate(model, parsed.world_size)
    whole = sum(e.end - e.begin for e in Checkpoint(hf.path(name)).tensors.values())
    for rank in range(parsed.world_size):
        grid = Grid(parsed, model, rank)
        checkpoint = open_checkpoint(hf.path(name), model)
        load_weights(grid, backend("float32"), checkpoint)
        assert checkpoint.stats.bytes_read == owned_bytes(model, grid, checkpoint)
        assert checkpoint.stats.bytes_read < whole
        assert checkpoint.stats.seconds > 0


def test_tensor_parallel_ranks_read_slices_that_add_up():
    config = checkpoint_run_config(hf.path("mixtral"))
    model = config.model
    layout = Layout(tp=2)
    reads = []
    for rank in range(2):
        checkpoint = open_checkpoint(hf.path("mixtral"), model)
        load_weights(Grid(layout, model, rank), backend("float32"), checkpoint)
        reads.append(checkpoint.stats.bytes_read)
    full = open_checkpoint(hf.path("mixtral"), model)
    load_weights(Grid(Layout(), model, 0), backend("float32"), full)
    # Experts, q/k/v/o split in two; embedding, LM head, router and norms on both.
    shared = sum(e.end - e.begin for n, e in full.tensors.items()
                 if "norm" in n or "gate.weight" in n or "embed" in n or "lm_head" in n)
    assert sum(reads) == full.stats.bytes_read + shared


# --- bad checkpoints -----------------------------------------------------------------------

def copy_fixture(tmp_path, name: str) -> str:
    target = tmp_path / name
    shutil.copytree(hf.path(name), target)
    return str(target)


def refused(directory: str) -> str:
    model = checkpoint_run_config(directory).model
    with pytest.raises(InputError) as info:
        open_checkpoint(directory, model)
    return str(info.value)


def test_missing_tensor_names_tensor_and_file(tmp_path):
    directory = copy_fixture(tmp_path, "olmoe")
    file_path = os.path.join(directory, "model.safetensors")
    with safe_open(file_path, "numpy") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, file_path)
    message = refused(directory)
    assert "tensor model.layers.2.mlp.experts.5.up_proj.weight" in message
    assert "model.safetensors" in message


def test_wrong_shape_and_dtype_name_tensor_and_file(tmp_path):
    directory = copy_fixture(tmp_path, "olmoe")
    file_path = os.path.join(directory, "model.safetensors")
    with safe_open(file_path, "numpy") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    name = "model.layers.0.self_attn.k_norm.weight"
    tensors[name] = np.ones(9, dtype=np.float32)
    save_file(tensors, file_path)
    assert f"tensor {name}: shape [9] in model.safetensors, but config.json gives [8]" \
        in refused(directory)
    tensors[name] = np.ones(8, dtype=np.int32)
    save_file(tensors, file_path)
    assert f"tensor {name}: dtype I32 in model.safetensors" in refused(directory)


def test_absent_shard_is_named(tmp_path):
    directory = copy_fixture(tmp_path, "qwen3_moe")
    os.remove(os.path.join(directory, "model-00002-of-00003.safetensors"))
    message = refused(directory)
    assert "shard model-00002-of-00003.safetensors" in message and "absent" in message


def rewrite_index(directory: str, change) -> None:
    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path) as handle:
        index = json.load(handle)
    change(index["weight_map"])
    with open(index_path, "w") as handle:
        json.dump(index, handle)


def opened_paths(monkeypatch) -> list[str]:
    """Every path opened from now on (builtins.open and numpy's memmap), resolved."""
    seen, real_open, real_memmap = [], open, np.memmap

    def spy_open(path, *args, **kwargs):
        seen.append(os.path.realpath(path))
        return real_open(path, *args, **kwargs)

    def spy_memmap(path, *args, **kwargs):
        seen.append(os.path.realpath(path))
        return real_memmap(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    monkeypatch.setattr(np, "memmap", spy_memmap)
    return seen


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "/etc/passwd",
                                   "sub/model-00001-of-00003.safetensors", "..", ".", "",
                                   "a\nb.safetensors"])
def test_a_shard_name_that_leaves_the_directory_is_refused_before_opening(tmp_path, shard,
                                                                           monkeypatch):
    directory = copy_fixture(tmp_path, "qwen3_moe")
    # A valid shard outside the directory: before the check, the index loaded it (exit 0).
    os.makedirs(tmp_path / "outside")
    first = "model-00001-of-00003.safetensors"
    shutil.copy(os.path.join(directory, first), tmp_path / "outside" / "x.safetensors")
    rewrite_index(directory, lambda weights: weights.update(
        {n: shard for n, f in list(weights.items()) if f == first}))
    opened = opened_paths(monkeypatch)
    message = refused(directory)
    assert message.startswith("model.safetensors.index.json weight_map: shard ")
    assert "\n" not in message
    inside = os.path.realpath(directory)
    assert all(os.path.dirname(p) == inside for p in opened), opened


def test_a_shard_symlinked_outside_the_directory_is_refused(tmp_path):
    directory = copy_fixture(tmp_path, "qwen3_moe")
    shard = "model-00002-of-00003.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(os.path.join(directory, shard), outside)
    os.symlink(outside, os.path.join(directory, shard))
    assert f"shard '{shard}' resolves to a file outside" in refused(directory)


def test_a_hub_cache_snapshot_may_link_into_its_blobs(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "models--x--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, entry in enumerate(sorted(os.listdir(hf.path("qwen3_moe")))):
        blob = repo / "blobs" / f"{number:040x}"
        shutil.copy(os.path.join(hf.path("qwen3_moe"), entry), blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / entry)
    model = checkpoint_run_config(str(snapshot)).model
    open_checkpoint(str(snapshot), model)


def test_a_shard_that_is_not_a_string_is_refused(tmp_path):
    directory = copy_fixture(tmp_path, "qwen3_moe")
    rewrite_index(directory, lambda weights: weights.__setitem__(
        "model.layers.0.mlp.gate.weight", 5))
    assert "weight_map: the shard of 'model.layers.0.mlp.gate.weight' must be a file name" \
        in refused(directory)


def test_truncated_file_is_caught_from_its_header(tmp_path):
    directory = copy_fixture(tmp_path, "qwen3_moe")
    file_path = os.path.join(directory, "model-00003-of-00003.safetensors")
    with open(file_path, "r+b") as handle:
        handle.truncate(os.path.getsize(file_path) - 100)
    assert "truncated?" in refused(directory)


def test_directory_without_weights_or_config(tmp_path):
    with pytest.raises(InputError, match="config.json does not exist"):
        checkpoint_run_config(str(tmp_path))
    shutil.copy(os.path.join(hf.path("olmoe"), "config.json"), tmp_path)
    assert "has neither model.safetensors nor model.safetensors.index.json" in refused(
        str(tmp_path))


# --- SPEC §1's model as a family: export and load back -------------------------------------

@pytest.mark.parametrize("shard_bytes", [None, 60_000])
def test_export_loads_back_bit_identical(tmp_path, shard_bytes):
    preset = build_run_config("tiny", sets=["pad_fraction=0.3"])
    files = export_generated(preset, str(tmp_path / "tiny"), shard_bytes)
    assert ("model.safetensors.index.json" in files) == (shard_bytes is not None)
    loaded = checkpoint_run_config(str(tmp_path / "tiny"), ["pad_fraction=0.3"])
    assert loaded.model == preset.model
    batch = synthetic_input(preset.workload, preset.model, preset.seed)
    want = run_layout(WORLD, preset, batch)
    got = run_layout(WORLD, loaded, batch)
    for key in ("hidden", "logits", "expert_counts"):
        assert np.array_equal(got[key], want[key]), key


def test_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export_generated(build_run_config("tiny"), str(tmp_path / "taken"))


def test_host_transpose_and_bf16_widening_are_exact():
    from spmd_moe.model.checkpoint import transpose, widen_bf16

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 130), (200, 70), (64, 64)]:
        a = rng.standard_normal(shape, dtype=np.float32)
        assert np.array_equal(transpose(a), a.T) and transpose(a).flags.c_contiguous
        b = a.astype(BF16)
        t = transpose(b)
        assert t.dtype == BF16 and t.tobytes() == np.ascontiguousarray(b.T).tobytes()
        assert np.array_equal(widen_bf16(b), b.astype(np.float32))


# --- on a GPU (skipped without one) ----------------------------------------------------------

def run_on_cupy(config, batch, decode_tokens=0, eos=None):
    """Prefill (and greedy decode) on the CuPy backend at one rank: (logits, tokens or
    None, the backend's kernels and kernels_reason)."""
    from spmd_moe.engine.runner import open_session, run_decode, run_prefill

    session = open_session(config, WORLD, batch, backend="cupy", new_tokens=decode_tokens)
    try:
        logits = run_prefill(session, batch).outputs["logits"]
        tokens = (run_decode(session, batch, decode_tokens, eos).outputs["tokens"]
                  if decode_tokens else None)
        return logits, tokens, session.backend.kernels, session.backend.kernels_reason
    finally:
        session.close()


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["fused", "generic"])
@pytest.mark.parametrize("name", hf.FLOAT32 + (hf.BF16,))
def test_cupy_backend_matches_transformers(name, kernels, monkeypatch):
    """Each family on CuPy against transformers, in float32: with the fused kernels
    (grouped-query flash attention over the K/V heads' cache, the SwiGLU FFN; the report's
    kernels_reason says so) and with the generic array code (SPMD_MOE_KERNELS=0); and bf16
    weights on the device as bf16."""
    if kernels == "generic":
        monkeypatch.setenv("SPMD_MOE_KERNELS", "0")
    config, batch, want, eos = hf.setup(name, dtype="float32", decode=True)
    logits, tokens, fused, reason = run_on_cupy(config, batch, hf.NEW_TOKENS, eos)
    if kernels == "fused":
        assert fused is not None and fused.fused_attention, reason
        assert "grouped-query" in reason and "swiglu experts" in reason, reason
    else:
        assert fused is None and "SPMD_MOE_KERNELS=0" in reason
    suffix = "_float32" if name == hf.BF16 else ""
    assert relative_error(logits, want["logits" + suffix]) < 1e-4
    assert np.array_equal(tokens, want["tokens" + suffix])
    if name == hf.BF16 and kernels == "fused":
        bf16 = checkpoint_run_config(hf.path(name)).model
        bk = Backend(choose_backend("cupy"), "bfloat16")
        on_device = load_weights(Grid(Layout(), bf16, 0), bk,
                                 open_checkpoint(hf.path(name), bf16))
        on_host = load_weights(Grid(Layout(), bf16, 0), backend("bfloat16"),
                               open_checkpoint(hf.path(name), bf16))
        w1 = on_device.layers[1].experts[5][0]
        assert w1.dtype == BF16                      # no float32 copy on the device
        assert np.array_equal(w1.get().astype(np.float32), on_host.layers[1].experts[5][0])


@pytest.mark.gpu
@pytest.mark.parametrize("name", hf.FLOAT32 + (hf.BF16,))
def test_cupy_fused_bfloat16_matches_numpy_and_transformers(name):
    """bfloat16 arithmetic through the fused kernels (bf16 tensor-core attention with
    grouped K/V heads, the SwiGLU FFN) against the NumPy backend's bf16 run of the same
    checkpoint and, for the bf16 checkpoint, transformers' own bf16 run: within the bf16
    tolerance (the NumPy run is itself 1.3e-2 to 2.7e-2 from transformers' float32 logits
    on these fixtures)."""
    config, batch, want, _ = hf.setup(name, dtype="bfloat16")
    logits, _, fused, reason = run_on_cupy(config, batch)
    assert fused is not None and fused.fused_attention, reason
    on_numpy = run_layout(WORLD, config, batch)["logits"]
    assert relative_error(logits, on_numpy) < TOLERANCE["bfloat16"]
    if name == hf.BF16:
        assert relative_error(logits, want["logits"]) < TOLERANCE["bfloat16"]
