"""Checkpoints (SPEC §8) on one rank: the safetensors reader against the safetensors package,
each family against transformers' own outputs on tiny random checkpoints, bfloat16 loaded
bit for bit, each rank reading only its share, bad checkpoints refused naming tensor and
file, unimplemented config fields refused naming the field, and SPEC §1's model exported
and loaded back bit-identical. (tests/mpi/test_checkpoint_mpi.py: the same at 2-4 ranks.)"""
import json
import math
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
    qwen2 = checkpoint_run_config(hf.path("qwen2_moe")).model
    assert (qwen2.family, qwen2.qkv_bias, qwen2.d_shared, qwen2.shared_gate,
            qwen2.dense_layers, qwen2.d_ff_dense, qwen2.router_renorm, qwen2.kv_heads) == (
        "qwen2_moe", True, 12, True, (1,), 20, False, 2)
    deepseek = checkpoint_run_config(hf.path("deepseek_v3")).model
    # transformers writes head_dim = qk_rope_head_dim (4): the query/key width is 8 + 4.
    assert (deepseek.attention, deepseek.head_dim, deepseek.rope_width, deepseek.v_dim,
            deepseek.q_lora_rank, deepseek.kv_lora_rank, deepseek.rope_interleave,
            deepseek.kv_heads, deepseek.cache_width) == ("mla", 12, 4, 6, 10, 12, True, 1, 16)
    assert (deepseek.router_score, deepseek.router_bias, deepseek.n_group,
            deepseek.topk_group, deepseek.top_k, deepseek.routed_scale, deepseek.router_renorm,
            deepseek.d_shared, deepseek.dense_layers, deepseek.d_ff_dense, deepseek.yarn,
            deepseek.fp8_block) == ("sigmoid", True, 4, 2, 3, 2.5, True, 16, (0,), 24, None,
                                    None)
    yarn = checkpoint_run_config(hf.path("deepseek_v3_yarn")).model
    assert (yarn.q_lora_rank, yarn.rope_interleave, yarn.n_group, yarn.router_renorm,
            yarn.dense_layers) == (0, False, 1, False, ())
    assert (yarn.yarn.factor, yarn.yarn.original_max) == (4.0, 16)
    assert yarn.yarn.attention_factor == pytest.approx((1 + 0.1 * math.log(4))
                                                       / (1 + 0.07 * math.log(4)))
    assert yarn.yarn.softmax_mscale == pytest.approx(1 + 0.07 * math.log(4))
    fp8 = checkpoint_run_config(hf.path(hf.FP8)).model
    assert (fp8.fp8_block, fp8.dtype) == ((8, 8), "bfloat16")


def test_published_rope_scaling_reads_as_transformers():
    """DeepSeek-V3's config.json as published: YaRN under the older ``rope_scaling`` key
    with ``type``, factor 40 from 4096 positions, mscale = mscale_all_dim = 1."""
    path = os.path.join(os.path.dirname(hf.ROOT), "..", "..", "docs", "models", "deepseek-v3",
                        "config.json")
    with open(path) as handle:
        data = json.load(handle)
    model = model_config_from_hf(data)
    assert (model.yarn.factor, model.yarn.original_max, model.yarn.beta_fast,
            model.yarn.beta_slow, model.yarn.attention_factor) == (40.0, 4096, 32.0, 1.0, 1.0)
    assert model.yarn.softmax_mscale == pytest.approx(0.1 * math.log(40) + 1)
    assert (model.fp8_block, model.n_experts, model.moe_layers, model.cache_width) == (
        (128, 128), 256, 58, 576)


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
    "rope scaling": (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4,
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
    "quantised": (dict(quantization_config={"quant_method": "gptq"}),
                  "config.json quantization_config.quant_method: 'gptq'"),
    "fp8 without blocks": (dict(quantization_config={"quant_method": "fp8"}),
                           "config.json quantization_config.weight_block_size: None"),
    "float16 without --dtype": (dict(dtype="float16"), "config.json dtype: float16"),
    "sliding layers": (dict(layer_types=["full_attention", "sliding_attention"]),
                       "config.json layer_types"),
    "bad kv heads": (dict(num_key_value_heads=3), "config.json num_key_value_heads: 3"),
    "missing field": (dict(num_hidden_layers=...), "config.json num_hidden_layers: missing"),
    "q/k/v biases outside Qwen2-MoE": (dict(qkv_bias=True), "config.json qkv_bias"),
    "fp8 in e5m2": (dict(quantization_config={"quant_method": "fp8", "fmt": "e5m2",
                                              "weight_block_size": [128, 128]}),
                    "config.json quantization_config.fmt: 'e5m2'"),
    "yarn without a number": (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                    "factor": "big"}),
                              "config.json rope_parameters.factor: 'big'"),
}
# Each family's own refusals (changes to its fixture's config.json).
FAMILY_REFUSED = {
    "qwen2 sliding window": ("qwen2_moe", dict(use_sliding_window=True, sliding_window=8),
                             "config.json sliding_window: 8"),
    "qwen2 no experts": ("qwen2_moe", dict(num_experts=0), "config.json num_experts: 0"),
    "qwen2 sparse step": ("qwen2_moe", dict(decoder_sparse_step=0),
                          "config.json decoder_sparse_step: 0 must be >= 1"),
    "deepseek softmax scores": ("deepseek_v3", dict(scoring_func="softmax"),
                                "config.json scoring_func: 'softmax'"),
    "deepseek greedy top-k": ("deepseek_v3", dict(topk_method="greedy"),
                              "config.json topk_method: 'greedy'"),
    "deepseek MoE every other layer": ("deepseek_v3", dict(moe_layer_freq=2),
                                       "config.json moe_layer_freq: 2"),
    "deepseek grouped kv": ("deepseek_v3", dict(num_key_value_heads=2),
                            "config.json num_key_value_heads: 2"),
    "deepseek attention bias": ("deepseek_v3", dict(attention_bias=True),
                                "config.json attention_bias"),
    "deepseek groups": ("deepseek_v3", dict(n_group=5), "config.json n_group: 5 must divide "
                                                        "n_experts=12"),
    "deepseek kept groups": ("deepseek_v3", dict(topk_group=1, num_experts_per_tok=4),
                             "config.json num_experts_per_tok: 4 is more than the 1 kept "
                             "groups of 3 experts hold"),
    "deepseek linear rope": ("deepseek_v3", dict(rope_parameters={"rope_type": "linear",
                                                                  "factor": 2.0}),
                             "config.json rope_parameters.rope_type: 'linear'"),
    "deepseek dense layers the Qwen2 way": ("deepseek_v3", dict(mlp_only_layers=[1]),
                                            "config.json mlp_only_layers"),
    "deepseek partial rotation": ("deepseek_v3", dict(partial_rotary_factor=0.5),
                                  "config.json partial_rotary_factor"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unimplemented_config_fields_are_refused_by_name(case):
    changes, message = REFUSED[case]
    with pytest.raises(ConfigError) as info:
        model_config_from_hf(mixtral_config(**changes))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", sorted(FAMILY_REFUSED))
def test_each_family_refuses_what_it_does_not_implement(case):
    name, changes, message = FAMILY_REFUSED[case]
    with open(os.path.join(hf.path(name), "config.json")) as handle:
        data = {**json.load(handle), **changes}
    with pytest.raises(ConfigError) as info:
        model_config_from_hf(data)
    assert message in str(info.value) and "\n" not in str(info.value)


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

@pytest.mark.parametrize("name", hf.FLOAT32 + (hf.FP8,))
def test_one_rank_matches_transformers(name):
    """Float32 logits within 1e-4 and generate()'s greedy tokens; the FP8 checkpoint run in
    float32 (dequantised exactly) against transformers on its dequantised weights."""
    config, batch, want, eos = hf.setup(name, dtype="float32", decode=True)
    logits, tokens = hf.float32_expected(name, want)
    prefill = run_layout(WORLD, config, batch)
    assert relative_error(prefill["logits"], logits) < 1e-4
    decode = run_layout(WORLD, config, batch, decode_tokens=hf.NEW_TOKENS, eos_id=eos)
    assert np.array_equal(decode["tokens"], tokens), (decode["tokens"], tokens)


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "deepseek_v3_yarn"])
def test_chunked_prefill_through_the_family_s_cache_matches_transformers(name):
    """Chunks of 3 tokens: a prompt's later chunks attend to its earlier ones through the
    cache the family chooses (MLA: the latent cache, expanded again per chunk), then
    decode continues from it (MLA: the absorbed form)."""
    from dataclasses import replace

    config, batch, want, eos = hf.setup(name, dtype="float32", decode=True)
    config = replace(config, workload=replace(config.workload, chunk_tokens=3))
    prefill = run_layout(WORLD, config, batch)
    assert relative_error(prefill["logits"], want["logits"]) < 1e-4
    decode = run_layout(WORLD, config, batch, decode_tokens=hf.NEW_TOKENS, eos_id=eos)
    assert np.array_equal(decode["tokens"], want["tokens"])


def test_absorbed_decode_is_the_expanded_attention():
    """The two forms of MLA are one function: a decode step in the absorbed form (over the
    latent cache) against the same step expanded, at float32 rounding, and the cache holds
    exactly kv_lora_rank + qk_rope_head_dim numbers per token and layer."""
    from spmd_moe.core.costs import latent_cache_bytes
    from spmd_moe.core.topology import Grid
    from spmd_moe.model import mla
    from spmd_moe.model.blocks import Rope, pack, rope_spec, softmax_scale
    from spmd_moe.model.kv_cache import LatentCache

    config, _, _, _ = hf.setup("deepseek_v3", dtype="float32")
    model = config.model
    bk = backend("float32")
    lw = load_weights(Grid(Layout(), model, 0), bk,
                      open_checkpoint(hf.path("deepseek_v3"), model)).layers[1]
    rng = np.random.default_rng(0)
    cache = LatentCache(bk, range(1, 2), 0, 3, 9, model.kv_lora_rank, model.rope_width)
    assert sum(a.nbytes for a in cache.arrays()) == latent_cache_bytes(1, 3, 9, 16, 4) == \
        3 * 9 * (12 + 4) * 4
    prompt = pack(bk, np.arange(3), np.array([5, 2, 7]))
    a = rng.standard_normal((14, model.d_model)).astype(np.float32)
    spec, scale = rope_spec(model), softmax_scale(model)
    mla.attention(bk, lw, model, a, prompt, Rope(bk, prompt.positions, spec), cache, 1,
                  model.n_heads, scale)
    cache.advance(prompt)
    step = pack(bk, np.arange(3), np.ones(3, dtype=np.int64), cache.lengths_host)
    x = rng.standard_normal((3, model.d_model)).astype(np.float32)
    rope = Rope(bk, step.positions, spec)
    got = mla.attention(bk, lw, model, x, step, rope, cache, 1, model.n_heads, scale)
    keys, _, starts, lengths = cache.view(1, step)
    rows = cache.gather(keys[:, 0], starts, lengths)
    q_nope, q_rope, _, _ = mla.project(bk, lw, model, x, model.n_heads, rope)
    want = mla.expanded(bk, model, q_nope, q_rope, np.arange(3), np.ones(3, dtype=np.int64),
                        rows[:, :12], rows[:, None, 12:],
                        np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths, lw.wkv_b,
                        scale)
    assert got.shape == (3, model.n_heads * model.v_dim)
    assert relative_error(got, want) < 1e-6


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


def test_fp8_blocks_dequantise_per_block_and_each_rank_reads_its_blocks():
    """W = W8 * S[i // 8, j // 8] with edge blocks partial, for any row and column slice
    (TP reads a head's columns across block edges), and both the float8 bytes and the
    scales read count."""
    import ml_dtypes

    config, _, _, _ = hf.setup(hf.FP8, dtype="float32")
    checkpoint = open_checkpoint(hf.path(hf.FP8), config.model)
    with open(os.path.join(hf.path(hf.FP8), "model.safetensors"), "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    name = "model.layers.1.self_attn.q_b_proj.weight"
    assert header[name]["dtype"] == "F8_E4M3" and header[name]["shape"] == [48, 10]
    w8 = checkpoint._block(checkpoint.tensors[name], np.dtype(np.uint8), None, None)
    scale = checkpoint.read(name + "_scale_inv")                               # [6, 2]
    values = w8.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    want = values * np.repeat(np.repeat(scale, 8, 0), 8, 1)[:48, :10]
    before = checkpoint.stats.bytes_read
    assert np.array_equal(checkpoint.read(name), want)
    assert checkpoint.stats.bytes_read - before == 48 * 10 + 6 * 2 * 4
    before = checkpoint.stats.bytes_read
    block = checkpoint.read(name, range(12, 36), range(5, 10))                # heads 1-2
    assert np.array_equal(block, want[12:36, 5:10])
    assert checkpoint.stats.bytes_read - before == 24 * 5 + 4 * 2 * 4   # scale rows 1-4, cols 0-1


def test_fp8_checkpoint_matches_transformers_in_bfloat16():
    """The FP8 checkpoint in its own dtype: dequantised, rounded to bf16, against
    transformers' bf16 run of the dequantised model (the bf16 tolerance)."""
    config, batch, want, _ = hf.setup(hf.FP8)
    assert config.model.dtype == "bfloat16"
    assert relative_error(run_layout(WORLD, config, batch)["logits"], want["logits"]) < 3e-2


def test_fp8_without_its_scales_is_refused(tmp_path):
    directory = copy_fixture(tmp_path, hf.FP8)
    file_path = os.path.join(directory, "model.safetensors")
    with open(file_path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    name = "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"
    assert name in header
    header.pop(name)
    rewrite_header(file_path, header)
    assert f"tensor {name}: missing from model.safetensors" in refused(directory)


def rewrite_header(path: str, header: dict) -> None:
    """Replace a safetensors file's header (the data stays; offsets must still fit)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + length)
        data = handle.read()
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + data)


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


def opened_by_os(monkeypatch) -> list[str]:
    """Every path os.open is asked for from now on, resolved: the read door opens every
    file of a model directory with it (the safetensors files are mapped from its handles,
    never reopened by name)."""
    seen, real = [], os.open

    def spy(path, *args, **kwargs):
        seen.append(os.path.realpath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
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
    opened = opened_by_os(monkeypatch)
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
    with pytest.raises(InputError, match="config.json: cannot read .*: No such file"):
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


def test_export_refuses_the_families_it_does_not_write(tmp_path):
    from dataclasses import replace

    for name in ("qwen2_moe", "deepseek_v3"):
        config = checkpoint_run_config(hf.path(name))
        with pytest.raises(ConfigError, match="family: export writes the spmd, mixtral, "
                                              "qwen3_moe, olmoe formats"):
            export_generated(config, str(tmp_path / name))
        assert not (tmp_path / name).exists()
    spec = build_run_config("tiny")
    with pytest.raises(ConfigError, match="family: export writes"):
        export_generated(replace(spec, model=replace(spec.model, qkv_bias=True)),
                         str(tmp_path / "biased"))


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
@pytest.mark.parametrize("name", hf.FLOAT32 + hf.LOW_PRECISION)
def test_cupy_backend_matches_transformers(name, kernels, monkeypatch):
    """Each family on CuPy against transformers, in float32: with the fused kernels
    (grouped-query flash attention over the K/V heads' cache, or MLA's prefill and its
    decode over the latent cache, the SwiGLU FFN; the report's kernels_reason says so) and
    with the generic array code (SPMD_MOE_KERNELS=0); and bf16 weights on the device as
    bf16."""
    if kernels == "generic":
        monkeypatch.setenv("SPMD_MOE_KERNELS", "0")
    config, batch, want, eos = hf.setup(name, dtype="float32", decode=True)
    logits, tokens, fused, reason = run_on_cupy(config, batch, hf.NEW_TOKENS, eos)
    if kernels == "fused":
        assert fused is not None and fused.fused_attention, reason
        attention = ("latent attention (prefill" if config.model.attention == "mla"
                     else "grouped-query")
        assert attention in reason and "swiglu experts" in reason, reason
    else:
        assert fused is None and "SPMD_MOE_KERNELS=0" in reason
    want_logits, want_tokens = hf.float32_expected(name, want)
    assert relative_error(logits, want_logits) < 1e-4
    assert np.array_equal(tokens, want_tokens)
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
@pytest.mark.parametrize("name", hf.FLOAT32 + hf.LOW_PRECISION)
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
    if name in hf.LOW_PRECISION:
        assert relative_error(logits, want["logits"]) < TOLERANCE["bfloat16"]


# --- hostile model directories (issue #22): every file through the read door -------------

@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer.json",
                                  "model.safetensors.index.json",
                                  "model-00002-of-00003.safetensors"])
def test_no_file_of_a_model_directory_is_read_outside_it(tmp_path, name, monkeypatch):
    """Any file of the directory linked outside it is refused before it is opened: the
    target is a FIFO, which an open would block on and a read would report as such."""
    directory = copy_fixture(tmp_path, "qwen3_moe")
    os.mkfifo(tmp_path / "trap")
    os.remove(os.path.join(directory, name))
    os.symlink(tmp_path / "trap", os.path.join(directory, name))
    opened = opened_by_os(monkeypatch)
    with pytest.raises((InputError, ConfigError)) as info:
        config = checkpoint_run_config(directory, ["workload=decode", "new_tokens=2"])
        open_checkpoint(directory, config.model)
        eos_token_ids(directory)
        TextTokenizer(directory)
    message = str(info.value)
    assert "outside" in message and "FIFO" not in message, message
    assert str(tmp_path / "trap") not in opened


def test_a_fifo_as_config_json_is_reported_as_what_it_is(tmp_path):
    directory = copy_fixture(tmp_path, "olmoe")
    os.remove(os.path.join(directory, "config.json"))
    os.mkfifo(os.path.join(directory, "config.json"))
    with pytest.raises(InputError, match="^config.json: .*config.json is a FIFO, not a "
                                         "regular file$"):
        checkpoint_run_config(directory)


def edit_json(path, change) -> None:
    with open(path) as handle:
        data = json.load(handle)
    change(data)
    with open(path, "w") as handle:
        json.dump(data, handle)


@pytest.mark.parametrize("change, message", [
    (dict(architectures=5), "config.json architectures: 5 must be a string or an array of "
                            "strings"),
    (dict(architectures=[{"x": 1}]), "config.json architectures: [{'x': 1}] must be"),
    (dict(model_type=[1], architectures=[]), "config.json model_type: [1] must be a string"),
    (dict(layer_types=[[1]]), "config.json layer_types: [[1]] must be an array of strings"),
    (dict(num_hidden_layers=2.0), "config.json num_hidden_layers: 2.0 must be an integer"),
    (dict(rope_scaling="linear"), "config.json rope_scaling: 'linear' must be an object"),
    (dict(tie_word_embeddings="no"), "config.json tie_word_embeddings: 'no' must be true"),
    (dict(mlp_only_layers=["0"]), "config.json mlp_only_layers: ['0'] must be an array of "
                                  "integers"),
])
def test_config_json_fields_are_type_checked_before_use(change, message):
    with pytest.raises(ConfigError) as info:
        model_config_from_hf(mixtral_config(**change))
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("value, message", [
    (1e26, "generation_config.json eos_token_id: 1e+26 must be an integer or an array of "
           "integers"),
    (100, "generation_config.json eos_token_id: 100 is not a token id (0 .. 99)"),
    ([2, -1], "generation_config.json eos_token_id: -1 is not a token id"),
    ([True], "generation_config.json eos_token_id: [True] must be an integer or an array"),
    (10 ** 30, "generation_config.json eos_token_id: 1000000000000000000000000000000 is not"),
])
def test_eos_ids_are_token_ids_of_the_vocabulary(tmp_path, value, message):
    directory = copy_fixture(tmp_path, "olmoe")
    edit_json(os.path.join(directory, "generation_config.json"),
              lambda data: data.update(eos_token_id=value))
    with pytest.raises(InputError) as info:
        eos_token_ids(directory, vocab_size=100)
    assert str(info.value).startswith(message), str(info.value)


def test_a_generation_config_that_is_not_an_object_is_one_line(tmp_path):
    directory = copy_fixture(tmp_path, "olmoe")
    with open(os.path.join(directory, "generation_config.json"), "w") as handle:
        handle.write("[1]")
    with pytest.raises(InputError, match="^generation_config.json: must be a JSON object, not "
                                         "an array"):
        eos_token_ids(directory)


def write_raw_safetensors(path, header: dict, data_bytes: int) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw + bytes(data_bytes))


def olmoe_with(tmp_path, entries: dict, data_bytes: int) -> str:
    """The olmoe fixture whose model.safetensors gets ``entries`` added to its header."""
    directory = copy_fixture(tmp_path, "olmoe")
    path = os.path.join(directory, "model.safetensors")
    with safe_open(path, "numpy") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        blobs.append(array.tobytes())
    header.update(entries)
    raw = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs) + bytes(data_bytes))
    return directory


NAME = "model.layers.0.mlp.gate.weight"


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [8, 2.0], "data_offsets": [0, 64]},
     f"tensor {NAME} shape: [8, 2.0] must be an array of integers"),
    ({"dtype": "F32", "shape": ["8", 16], "data_offsets": [0, 64]},
     f"tensor {NAME} shape: ['8', 16] must be an array of integers"),
    ({"dtype": "F32", "shape": [-8, -16], "data_offsets": [0, 512]}, f"tensor {NAME} shape: "),
    ({"dtype": 5, "shape": [8, 16], "data_offsets": [0, 512]},
     f"tensor {NAME} dtype: 5 must be a string"),
    ({"dtype": "F32", "shape": [8, 16], "data_offsets": [0, 512, 1]},
     f"tensor {NAME} data_offsets: "),
    ({"dtype": "F32", "shape": [8, 16], "data_offsets": [0, 512]}, "its data overlaps tensor"),
])
def test_safetensors_header_entries_are_type_checked(tmp_path, entry, message):
    # The gate's entry replaced (same name: a JSON object keeps the last one).
    directory = olmoe_with(tmp_path, {NAME: entry}, 0)
    model = checkpoint_run_config(directory).model
    with pytest.raises(InputError) as info:
        open_checkpoint(directory, model)
    assert message in str(info.value), str(info.value)


def test_a_tensor_entered_twice_is_refused(tmp_path):
    directory = copy_fixture(tmp_path, "olmoe")
    path = os.path.join(directory, "model.safetensors")
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    raw = f'{{"a": {entry}, "a": {entry}}}'.encode()
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(InputError, match="has the key 'a' twice"):
        open_checkpoint(directory, checkpoint_run_config(directory).model)


def test_a_header_is_sized_before_it_is_held(tmp_path):
    """A header longer than the model's tensors can take is refused from its 8-byte length,
    before any of it is read (3 shards of 700k dummy entries took 1.28 GB per rank)."""
    from spmd_moe.model.checkpoint import HEADER_BYTES_PER_TENSOR, HEADER_SLACK, header_limit

    directory = copy_fixture(tmp_path, "qwen3_moe")
    model = checkpoint_run_config(directory).model
    limit = header_limit(model)
    assert limit == HEADER_SLACK + HEADER_BYTES_PER_TENSOR * len(list(checkpoint_tensors(model)))
    path = os.path.join(directory, "model-00002-of-00003.safetensors")
    with open(path, "wb") as handle:
        handle.write((limit + 1).to_bytes(8, "little"))
        handle.truncate(8 + limit + 1)                 # sparse: a huge header, never read
    with pytest.raises(InputError, match=f"header of {limit + 1} bytes; the tensors this "
                                         f"model needs take at most {limit}"):
        open_checkpoint(directory, model)


def test_only_the_tensors_the_model_needs_are_kept(tmp_path):
    dummies = {f"junk.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
               for i in range(2000)}
    directory = olmoe_with(tmp_path, dummies, 0)
    model = checkpoint_run_config(directory).model
    checkpoint = open_checkpoint(directory, model)
    assert set(checkpoint.tensors) == {w.name for _, w in checkpoint_tensors(model)}


@pytest.mark.parametrize("change, message", [
    (dict(num_hidden_layers=20000),
     "tensor model.layers.3.self_attn.q_proj.weight: missing from model.safetensors"),
    (dict(num_hidden_layers=20000, num_experts=2000),
     "tensor model.layers.0.mlp.gate.weight: shape [8, 16] in model.safetensors, but "
     "config.json gives [2000, 16]"),
])
def test_the_name_check_stops_at_the_first_missing_tensor(tmp_path, change, message):
    """20,000 layers x 2,000 experts of size 1 hung in set-up listing 120 M names (and
    every rank's memory grew by 30 MB/s) while ``plan`` said it fits."""
    directory = copy_fixture(tmp_path, "olmoe")
    edit_json(os.path.join(directory, "config.json"), lambda data: data.update(change))
    model = checkpoint_run_config(directory).model
    with pytest.raises(InputError) as info:
        open_checkpoint(directory, model)
    assert str(info.value).startswith(message)


def test_an_index_that_is_not_a_map_is_refused(tmp_path):
    directory = copy_fixture(tmp_path, "qwen3_moe")
    edit_json(os.path.join(directory, "model.safetensors.index.json"),
              lambda data: data.update(weight_map=["model-00001-of-00003.safetensors"]))
    with pytest.raises(InputError, match="^model.safetensors.index.json weight_map: \\['model"
                                         ".*must be an object"):
        open_checkpoint(directory, checkpoint_run_config(directory).model)


def test_export_writes_files_the_safetensors_package_reads(tmp_path):
    config = build_run_config("tiny")
    files = export_generated(config, str(tmp_path / "m"), 20_000)
    checkpoint = Checkpoint(str(tmp_path / "m"))
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(tmp_path / "m" / name), "numpy") as theirs:
                for tensor in theirs.keys():
                    assert theirs.get_tensor(tensor).tobytes() == \
                        checkpoint.read(tensor).tobytes()


def test_export_leaves_nothing_when_writing_fails(tmp_path, monkeypatch):
    """A full disk on the third shard: no directory, no temporary, one-line error."""
    import errno

    from spmd_moe.core.errors import OutputError
    from spmd_moe.model import checkpoint as module

    real, written = module.write_safetensors, []

    def failing(out, *args):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(real(out, *args))

    monkeypatch.setattr(module, "write_safetensors", failing)
    with pytest.raises(OutputError, match=f"^export: cannot write {tmp_path / 'm'}: No space "
                                          "left on device$"):
        export_generated(build_run_config("tiny"), str(tmp_path / "m"), 20_000)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(module, "write_safetensors", real)
    assert "config.json" in export_generated(build_run_config("tiny"), str(tmp_path / "m"))


def test_export_checks_host_memory_first(tmp_path, monkeypatch):
    monkeypatch.setattr("spmd_moe.backend.host.host_memory", lambda ranks: (1000, "test"))
    with pytest.raises(ConfigError, match="^export: writing .* needs 0.0 GiB of host memory "
                                          r"\(its largest tensor\) but 0.0 GiB is available"):
        export_generated(build_run_config("tiny"), str(tmp_path / "m"))
    assert os.listdir(tmp_path) == []


# --- the latent cache in the memory check and plan ---------------------------------------------

def test_the_engine_allocates_the_latent_cache_the_memory_check_charges():
    """MLA keeps kv_lora_rank + qk_rope_head_dim numbers per token and layer: the cache the
    engine allocates for a chunked prefill with decode is exactly rank_cost's KV bytes."""
    from dataclasses import replace

    from spmd_moe.core.costs import latent_cache_bytes, rank_cost
    from spmd_moe.engine.runner import open_session, run_decode
    from spmd_moe.model.kv_cache import LatentCache

    config, batch, _, eos = hf.setup("deepseek_v3", dtype="float32", decode=True)
    config = replace(config, workload=replace(config.workload, chunk_tokens=4))
    session = open_session(config, WORLD, batch, backend="numpy", new_tokens=hf.NEW_TOKENS)
    caches, new_cache = [], session.engine.new_cache
    session.engine.new_cache = lambda b, n: caches.append(new_cache(b, n)) or caches[-1]
    try:
        run_decode(session, batch, hf.NEW_TOKENS, eos)
        cost = rank_cost(config, session.topo, batch.lengths, "numpy", hf.NEW_TOKENS)
    finally:
        session.close()
    (cache,) = caches
    assert isinstance(cache, LatentCache)
    allocated = sum(a.nbytes for a in cache.arrays())
    capacity = int(batch.lengths.max()) + hf.NEW_TOKENS
    assert allocated == cost.kv_bytes == latent_cache_bytes(3, 5, capacity, 12 + 4, 4)


def test_plan_of_deepseek_v3_counts_the_latent_and_the_fp8_share():
    from spmd_moe.commands.plan import format_plan, make_plan
    from spmd_moe.core.costs import GIB, latent_cache_bytes

    path = os.path.join(os.path.dirname(hf.ROOT), "..", "..", "docs", "models", "deepseek-v3")
    config = checkpoint_run_config(path, ["batch_size=16", "seq_len=4096", "workload=decode",
                                          "new_tokens=256"])
    layout, costs = make_plan(config, 32, "ep=16,pp=2")
    worst = max(costs, key=lambda c: c.memory_bytes)
    # Stage 1 holds 30 of the 61 layers and one sequence per rank.
    assert worst.kv_bytes == latent_cache_bytes(30, 1, 4096 + 256, 576, 2)
    text = format_plan(config, layout, costs, 80 * GIB)
    assert "KV cache: the latent, 576 numbers per token and layer (512 + 64; 128 heads' " \
           "expanded keys and values would be 40960, 71x more)" in text
    assert "GiB read from the FP8 checkpoint as shipped" in text
    assert "num_nextn_predict_layers 1: multi-token-prediction weights ignored" in text
    assert "latent attention (q rank 1536, q/k head dim 192 = 128 + 64 rope, values 128" in text
