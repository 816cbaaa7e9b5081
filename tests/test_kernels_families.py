"""Which pieces run fused for a model (engine.fit_kernels_to_family, kernels.fit_model), and
the engine running each checkpoint family (tests/data/hf) and SPEC §1's model with grouped
K/V heads through the fused launch code on the fake device, against transformers' logits and
greedy tokens and against the generic NumPy path."""
from __future__ import annotations

import hf_fixtures as hf
import numpy as np
import pytest
from fakes.engine import CHOICE, FakeGpuBackend, run_on_fake_gpu
from fakes.kernels import launches
from kernel_cases import relative_error

from spmd_moe.backend import kernels


def fake_backend(dtype: str = "float32"):
    """The CuPy backend on the fake device, with the fused kernels' launch code."""
    return FakeGpuBackend(CHOICE, dtype)


def test_unsupported_head_dim_leaves_only_attention_to_the_generic_code(fake_gpu):
    bk = fake_backend()
    loaded = bk.kernels
    kernels.fit_model(bk, 128)
    assert bk.kernels is loaded and bk.kernels.fused_attention
    kernels.fit_model(bk, 256)
    assert bk.kernels is not None and not bk.kernels.fused_attention
    assert loaded.fused_attention            # the process's shared kernels are untouched
    assert ("attention: generic array code (fused attention supports even head dims up to "
            "128 (and 192 with values up to 128), not 256)") in bk.kernels_reason
    assert "expert FFN (cuBLAS + in-place GELU or SwiGLU), permutation" in bk.kernels_reason
    reason = bk.kernels_reason
    kernels.fit_model(bk, 256)
    assert bk.kernels_reason == reason


def family_reason(model) -> tuple[object, str]:
    from spmd_moe.engine.engine import fit_kernels_to_family

    bk = fake_backend()
    fit_kernels_to_family(bk, model)
    first = bk.kernels_reason
    fit_kernels_to_family(bk, model)                       # idempotent
    assert bk.kernels_reason == first
    return bk.kernels, first


def test_every_family_runs_fused_and_says_so(fake_gpu):
    from dataclasses import replace

    from spmd_moe.core.config import build_run_config
    from spmd_moe.model.checkpoint import checkpoint_run_config

    spec = build_run_config("tiny").model
    fused, reason = family_reason(spec)
    assert fused.fused_attention
    assert reason.endswith("; spmd model: fused multi-head attention of head dim 8 and gelu "
                           "experts")
    for name, group, head_dim in (("mixtral", 2, 4), ("qwen3_moe", 2, 6), ("olmoe", 2, 4),
                                  ("qwen2_moe", 2, 4)):
        model = checkpoint_run_config(hf.path(name)).model
        fused, reason = family_reason(model)
        assert fused is not None and fused.fused_attention, reason
        assert reason.endswith(f"; {name} model: fused grouped-query ({group} query heads per "
                               f"K/V head) attention of head dim {head_dim} and swiglu "
                               "experts"), reason
        assert "generic" not in reason and "MLA decode" not in reason
    model = checkpoint_run_config(hf.path("deepseek_v3")).model
    fused, reason = family_reason(model)
    assert fused.fused_attention and fused.fuses("mla_decode") and fused.fuses("router")
    assert "MLA decode over the latent cache" in reason and ", expert order" in reason
    assert "router: generic array code (sigmoid scores with a selection bias and expert " \
           "groups)" in reason
    assert reason.endswith("; deepseek_v3 model: fused latent attention (prefill of head dim "
                           "12 with values of 6, decode over the latent cache) and swiglu "
                           "experts"), reason
    fused, reason = family_reason(replace(spec, d_model=1024, n_heads=4))   # head dim 256
    assert fused is not None and not fused.fused_attention
    assert "attention: generic array code (fused attention supports even head dims up to " \
           "128 (and 192 with values up to 128), not 256)" in reason \
        and reason.endswith("; spmd model: fused gelu experts")
    wide = replace(model, kv_lora_rank=1024)                         # beyond the registers
    fused, reason = family_reason(wide)
    assert not fused.fuses("mla_decode") and "MLA decode: generic array code (latent 1024" \
        in reason and reason.endswith("(prefill of head dim 12 with values of 6) and swiglu "
                                      "experts")


def run_on_fake_device(monkeypatch, config, batch, decode_tokens=0, eos=None, layout=None):
    """The engine through the fused kernels' launch code (emulated kernels) at one rank on
    the fake device: (outputs, kernel launches)."""
    from mpi4py import MPI

    outputs, device = run_on_fake_gpu(monkeypatch, MPI.COMM_SELF, config, batch, layout,
                                      decode_tokens=decode_tokens, eos=eos)
    (bk,) = device.backends
    assert bk.kernels is not None and bk.kernels.fused_attention, bk.kernels_reason
    return outputs, launches(bk.kernels)


@pytest.mark.parametrize("name", hf.FLOAT32 + hf.LOW_PRECISION)
def test_each_family_through_the_fused_launch_code_matches_transformers(monkeypatch, name):
    """Each family through the kernels' launch code: grouped-query attention over the KV
    cache of the K/V heads, MLA (its prefill with values of their own width, its decode
    over the latent cache), SwiGLU experts, shared experts and dense layers, q/k/v biases,
    interleaved and YaRN RoPE: the same tolerance and greedy tokens as the generic path."""
    config, batch, want, eos = hf.setup(name, dtype="float32", decode=True)
    model = config.model
    logits, tokens = hf.float32_expected(name, want)
    prefill, ran = run_on_fake_device(monkeypatch, config, batch)
    assert relative_error(prefill["logits"], logits) < 1e-4
    assert ran["swiglu_f32"] > 0 and ran["gather_rows_v16"] > 0
    assert ran["unpermute_weighted_f32_v16"] > 0
    layers, moe_layers = model.n_layers, model.moe_layers
    assert sum(n for k, n in ran.items() if k.startswith("flash_attention_f32_d16")) == layers
    # The row-wise kernels: one each per layer (RMSNorm: attention's, MLA's two low-rank
    # norms, and the final norm).
    assert ran[f"rope_{model.qk_norm}_f32"] == layers
    assert ran["expert_order"] == ran.get("router_topk", moe_layers) == moe_layers
    assert ran["add_rms_norm_f32"] == ran["residual_add_f32"] == layers
    norms = 1 + (model.attention == "mla") + (model.q_lora_rank > 0)
    assert ran["rms_norm_f32"] == norms * layers + 1
    assert ran.get("bias_add_f32", 0) == (3 * layers if model.qkv_bias else 0)
    # SwiGLU passes: each layer's experts with rows, the shared expert, a dense MLP.
    assert ran["swiglu_f32"] >= moe_layers * (1 + bool(model.d_shared)) + len(
        model.dense_layers)
    assert ("router_topk" in ran) == (model.router_score == "softmax")
    decode, ran = run_on_fake_device(monkeypatch, config, batch, hf.NEW_TOKENS, eos)
    assert np.array_equal(decode["tokens"], tokens)
    if model.attention == "mla":
        # Decode steps attend over the latent cache: one MLA launch per layer and step.
        assert ran["mla_decode_f32"] >= layers * (hf.NEW_TOKENS - 1) // 2
        assert sum(n for k, n in ran.items() if k.startswith("flash_attention_")) == layers
    else:
        assert ran["flash_attention_f32_d16"] > layers                 # prefill, then steps


@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1])
def test_grouped_query_spec_model_through_the_fused_launch_code(monkeypatch, kv_heads):
    """SPEC §1's model with 8 query heads of dim 16 over 8, 4, 2 or 1 K/V heads and SwiGLU
    experts, prefill and decode, against the generic NumPy path."""
    from mpi4py import MPI

    from spmd_moe.core.config import build_run_config
    from spmd_moe.engine.testing import run_layout
    from spmd_moe.model.inputs import synthetic_input

    config = build_run_config("tiny", sets=["dtype=float32", "pad_fraction=0.3", "n_heads=8",
                                            "d_head=16", f"n_kv_heads={kv_heads}",
                                            "activation=swiglu", "n_layers=2"])
    batch = synthetic_input(config.workload, config.model, config.seed)
    want = run_layout(MPI.COMM_SELF, config, batch)
    got, ran = run_on_fake_device(monkeypatch, config, batch)
    for key in ("hidden", "logits"):
        assert relative_error(got[key], want[key]) < 1e-5, key
    assert np.array_equal(got["expert_counts"], want["expert_counts"])
    assert ran["flash_attention_f32_d16"] == 2 and ran["swiglu_f32"] > 0
    want = run_layout(MPI.COMM_SELF, config, batch, decode_tokens=4)
    got, _ = run_on_fake_device(monkeypatch, config, batch, decode_tokens=4)
    assert np.array_equal(got["tokens"], want["tokens"])
