"""Discovery finds exactly the decoder layers that hold routed experts."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moekit
from moekit.arch.adapters import FAMILIES
from moekit.errors import UnsupportedModelError

# Dense layers of the tiny configs, set there through each family's own config keys
# (mlp_only_layers, first_k_dense_replace, moe_layer_start_index, moe_layers).
EXPECTED_MOE_LAYERS = {
    "qwen2_moe": [1, 2],
    "qwen3_moe": [0, 2],
    "deepseek_v2": [1, 2],
    "deepseek_v3": [1, 2],
    "glm4_moe": [1, 2],
    "ernie4_5_moe": [1, 2],
    "llama4": [0, 2],
}


def test_finds_the_routed_layers(family, model):
    found = [layer.index for layer in moekit.moe_layers(model)]
    # Independent count: decoder layers owning a fused expert tensor.
    from_names = sorted(
        {int(m.group(1)) for name, _ in model.named_parameters() if (m := re.search(r"layers\.(\d+)\..*gate_up_proj$", name))}
    )
    assert found == from_names == EXPECTED_MOE_LAYERS.get(family, [0, 1, 2])
    infos = moekit.decoder_layers(model)
    assert [i.index for i in infos] == list(range(model.config.num_hidden_layers))
    assert [i.index for i in infos if not i.is_moe] == sorted(set(range(3)) - set(found))


def test_layer_fields(family, model):
    layer = moekit.moe_layers(model)[0]
    assert layer.family == family
    assert layer.num_experts == 8 and layer.top_k == 2
    assert model.get_submodule(layer.path) is layer.block
    has_shared = FAMILIES[family].shared is not None
    assert (layer.shared is not None) == has_shared


def test_correction_bias_is_a_view(model, family):
    layer = moekit.moe_layers(model)[-1]
    bias = layer.router.correction_bias
    if FAMILIES[family].correction_bias is None:
        assert bias is None
        return
    assert bias.shape == (layer.num_experts,)
    with torch.no_grad():
        bias[3] = 7.0
    assert layer.router.correction_bias[3].item() == 7.0


def test_dense_model_is_refused_with_the_supported_list():
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    dense = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError) as err:
        moekit.moe_layers(dense)
    message = str(err.value)
    assert "LlamaForCausalLM" in message and "'llama'" in message
    for name in FAMILIES:
        assert name in message


def test_moe_family_without_moe_layers_is_refused():
    from moekit.zoo.tiny import tiny_config

    config = tiny_config("qwen3_moe")
    config.mlp_only_layers = [0, 1, 2]
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="no decoder layer .* routed-expert block"):
        moekit.moe_layers(model)


def test_supports_explains():
    from moekit.zoo.tiny import tiny_model

    mixtral = tiny_model("mixtral")
    ok, why = FAMILIES["qwen3_moe"].supports(mixtral, explain=True)
    assert not ok and "mixtral" in why
    assert FAMILIES["mixtral"].supports(mixtral) is True
