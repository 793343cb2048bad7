"""`moekit inspect`: table for people, JSON for scripts, clean errors for bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import moekit
from moekit.cli import app

runner = CliRunner()


def test_inspect_json_matches_the_api():
    result = runner.invoke(app, ["inspect", "moekit/tiny-deepseek_v3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    expected = moekit.summarize(moekit.load("moekit/tiny-deepseek_v3"))
    assert payload["total_params"] == expected.total_params
    assert payload["active_params"] == expected.active_params
    assert [l["kind"] for l in payload["layers"]] == ["dense", "moe", "moe"]


def test_inspect_default_model_renders_a_table():
    result = runner.invoke(app, ["inspect"])
    assert result.exit_code == 0, result.output
    assert "experts" in result.stdout and "active per token" in result.stdout


def test_inspect_bad_path_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "no such folder" in result.output
    assert "Traceback" not in result.output


def test_inspect_describes_a_dense_model_and_refuses_a_model_of_another_layout(tmp_path):
    """A dense decoder is described (tests/cli/test_wording.py: the shipped one); a model
    whose layers are not transformers' usual ``model.layers`` is still refused, naming its class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    result = runner.invoke(app, ["inspect", str(tmp_path / "dense"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["family"] == "llama"
    config = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=16, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    result = runner.invoke(app, ["inspect", str(tmp_path / "gpt2")])
    assert result.exit_code == 2
    assert "GPT2LMHeadModel" in result.output and "Supported families" in result.output

