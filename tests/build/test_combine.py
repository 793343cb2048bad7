"""Combining dense models: identical models combine into an MoE with their logits; each
expert is its model's MLP and the shared weights are averaged; hidden-state routers send a
model's own data to its expert more than to the others; models of other shapes or
tokenizers are refused, naming the difference, before any weight is read."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3Config

from moekit.build.combine import combine
from moekit.errors import MoekitError
from moekit.zoo.tiny import TINY_TOKENIZER_DIR, randomize_
from tests.checkpoints import write_checkpoints

IDS = torch.randint(3, 280, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from moekit.data.tokenizer import load_tokenizer, save_tokenizer

    root = write_checkpoints(tmp_path_factory.mktemp("combine"), [], documents=3)
    for name, seed, width in (("a", 0, 48), ("b", 1, 48), ("wide", 2, 64)):
        config = Qwen3Config(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, intermediate_size=width, max_position_embeddings=256)
        randomize_(AutoModelForCausalLM.from_config(config), seed=seed).save_pretrained(root / name)
        save_tokenizer(load_tokenizer(TINY_TOKENIZER_DIR), root / name)
    return root


def _logits(folder):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(IDS).logits


def test_identical_models_combine_into_their_own_logits(models, tmp_path):
    combine([models / "a", models / "a"], out_dir=tmp_path / "moe", top_k=1, data=[str(models / "data")] * 2,
            n_samples=2, seq_len=32)
    torch.testing.assert_close(_logits(tmp_path / "moe"), _logits(models / "a"), rtol=0, atol=1e-5)


def test_experts_are_the_models_mlps_and_the_rest_is_averaged(models, tmp_path):
    report = combine([models / "a", models / "b"], out_dir=tmp_path / "moe", top_k=1, router="random")
    assert report["experts"] == 2 and report["family"] == "qwen3_moe"
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    sources = [AutoModelForCausalLM.from_pretrained(models / n, dtype=torch.float32) for n in ("a", "b")]
    for index, layer in enumerate(moe.model.layers):
        for e, source in enumerate(sources):
            mlp = source.model.layers[index].mlp
            torch.testing.assert_close(layer.mlp.experts.down_proj[e], mlp.down_proj.weight)
            torch.testing.assert_close(layer.mlp.experts.gate_up_proj[e][:48], mlp.gate_proj.weight)
        average = (sources[0].model.layers[index].self_attn.q_proj.weight
                   + sources[1].model.layers[index].self_attn.q_proj.weight) / 2
        torch.testing.assert_close(layer.self_attn.q_proj.weight, average)


def test_hidden_routers_are_unit_mean_directions_of_each_models_mlp_inputs(models, tmp_path):
    combine([models / "a", models / "b"], out_dir=tmp_path / "moe", top_k=1, data=[str(models / "data")] * 2,
            n_samples=2, seq_len=32)
    with safe_open(str(tmp_path / "moe" / "model.safetensors"), framework="pt") as f:
        router = f.get_tensor("model.layers.0.mlp.gate.weight").float()
    torch.testing.assert_close(router.norm(dim=-1), torch.ones(2), atol=1e-3, rtol=0)
    assert not torch.allclose(router[0], router[1])  # two models, two directions


def test_other_shapes_and_tokenizers_are_refused_before_any_weight_is_read(models, tmp_path):
    with pytest.raises(MoekitError, match="intermediate_size 64"):
        combine([models / "a", models / "wide"], out_dir=tmp_path / "x")
    other = tmp_path / "other-tokenizer"
    AutoModelForCausalLM.from_pretrained(models / "b").save_pretrained(other)
    (other / "tokenizer.json").write_text((models / "b" / "tokenizer.json").read_text().replace('"<', '"<x', 1))
    with pytest.raises(MoekitError, match="tokenizer differs"):
        combine([models / "a", other], out_dir=tmp_path / "y")
    with pytest.raises(MoekitError, match="at least two"):
        combine([models / "a"], out_dir=tmp_path / "z")
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_the_command_reports_in_json_and_refuses_with_exit_code_2(models, tmp_path):
    import json

    from typer.testing import CliRunner

    from moekit.cli import app

    ok = CliRunner().invoke(app, ["combine", str(models / "a"), str(models / "b"), "-o", str(tmp_path / "moe"),
                                  "--router", "random", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["experts"] == 2
    refused = CliRunner().invoke(app, ["combine", str(models / "a"), str(models / "a"), "-o", str(tmp_path / "x"),
                                       "--top-k", "3"])
    assert refused.exit_code == 2 and "--top-k 3 must be between 1 and the number of models (2)" in refused.output
