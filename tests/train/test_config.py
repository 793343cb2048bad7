"""Config -> HF model for every trainable family; bad configs fail before training."""

import json

import pytest

import moekit
from moekit.errors import MoekitError
from moekit.train import FAMILIES, build_model, load_model_config

from .conftest import tiny_spec


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_builds_an_moe_with_the_requested_shape(family):
    config = load_model_config(tiny_spec(family, num_experts=6, top_k=3))
    assert config.model_type == family and config.output_router_logits is False
    layers = moekit.moe_layers(build_model(config, seed=0))
    assert len(layers) == 2 and {(l.num_experts, l.top_k) for l in layers} == {(6, 3)}


def test_same_seed_same_weights():
    config = load_model_config(tiny_spec("mixtral"))
    a, b = build_model(config, seed=3), build_model(config, seed=3)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))


def test_hf_config_json_is_accepted(tmp_path):
    config = load_model_config(tiny_spec("olmoe"))
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    again = load_model_config(json.loads(path.read_text()))
    assert again.num_experts == 8 and again.model_type == "olmoe"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"family": "gpt2"}, "unknown architecture 'gpt2'"),
        ({"model_type": "llama"}, "unknown architecture 'llama'"),
        (tiny_spec("qwen3_moe", top_k=9), "top-k \\(9\\) must be between 1 and the number of experts \\(8\\)"),
        (tiny_spec("mixtral", hidden_sizes=3), "invalid model config: hidden_sizes"),
        (tiny_spec("deepseek_v3", extra={"n_group": 3}), "n_group=3"),
        (tiny_spec("mixtral", num_layers=0), "num_layers: Input should be greater than or equal to 1 \\(got 0\\)"),
        (tiny_spec("olmoe", hidden_size=30, num_heads=4), "hidden_size 30 is not a multiple of num_heads 4"),
        (tiny_spec("qwen3_moe", num_heads=4, num_kv_heads=3), "num_heads 4 is not a multiple of num_kv_heads 3"),
    ],
)
def test_bad_configs_fail_clearly(spec, message):
    with pytest.raises(MoekitError, match=message):
        load_model_config(spec)
