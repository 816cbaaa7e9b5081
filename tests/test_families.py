"""Checkpoint families (spmd_moe/model/families.py): which config.json is which family,
the ModelConfig each gives, and where each of our tensors lives in its checkpoint."""
import dataclasses

import pytest

from spmd_moe.core.config import build_run_config
from spmd_moe.core.errors import ConfigError
from spmd_moe.model.families import (FAMILY_TABLE, SIMPLE_FAMILIES, checkpoint_tensors,
                                     family_of, hf_config, model_config_from_hf,
                                     tensor_location)


@pytest.mark.parametrize("family", SIMPLE_FAMILIES)
def test_config_json_round_trips_through_each_family(family):
    table = FAMILY_TABLE[family]
    base = build_run_config("tiny").model
    model = dataclasses.replace(base, family=family, activation=table.activation,
                                qk_norm=table.qk_norm,
                                router_renorm=True if table.renorm_key is None else False)
    hf = hf_config(model)
    assert family_of(hf) is table
    assert model_config_from_hf(hf, model.dtype) == model


def test_export_writes_only_the_simple_families():
    model = dataclasses.replace(build_run_config("tiny").model, family="deepseek_v3")
    assert set(FAMILY_TABLE) - set(SIMPLE_FAMILIES) == {"deepseek_v3", "qwen2_moe"}
    with pytest.raises(ConfigError, match="family: export writes the spmd, mixtral, "
                                          "qwen3_moe, olmoe formats, not deepseek_v3's"):
        hf_config(model)


def test_the_family_is_found_by_architecture_then_model_type():
    assert family_of({"architectures": ["OlmoeForCausalLM"]}).name == "olmoe"
    assert family_of({"architectures": "MixtralForCausalLM"}).name == "mixtral"
    assert family_of({"model_type": "qwen3_moe"}).name == "qwen3_moe"
    with pytest.raises(ConfigError, match="config.json architectures: LlamaForCausalLM is "
                                          "not supported"):
        family_of({"architectures": ["LlamaForCausalLM"], "model_type": "mixtral"})


def test_tensor_names_shapes_and_transposes():
    base = build_run_config("tiny").model
    qwen = dataclasses.replace(base, family="qwen3_moe", activation="swiglu", qk_norm="head",
                               router_renorm=False)
    w3 = tensor_location(qwen, "layers.2.experts.5.w3")
    assert w3.name == "model.layers.2.mlp.experts.5.up_proj.weight"
    assert w3.shape == (base.d_ff, base.d_model) and w3.transposed          # [out, in]
    norm = tensor_location(qwen, "layers.1.q_norm")
    assert norm.name == "model.layers.1.self_attn.q_norm.weight" and not norm.transposed
    tied = dataclasses.replace(qwen, tie_word_embeddings=True)
    head = tensor_location(tied, "lm_head")
    assert head.name == "model.embed_tokens.weight" and head.transposed
    names = [where.name for _, where in checkpoint_tensors(tied)]
    assert len(names) == len(set(names)) and "lm_head.weight" not in names   # tied: no head
    # Embedding; per layer q, k, v, o, router, two norms, q/k norms, 3 per expert; final
    # norm, LM head.
    every = list(checkpoint_tensors(qwen))
    assert len(every) == 1 + base.n_layers * (9 + 3 * base.n_experts) + 2 == len(names) + 1
