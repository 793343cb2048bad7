"""Upcycling: copy and virtual groups reproduce the dense model's logits at step 0 for every
dense family moekit upcycles (reloaded by plain transformers); drop re-initialises exactly its
share of neurons; a virtual-group router picks whole groups; bad input is refused before any
weight is read."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config
from typer.testing import CliRunner

from moekit.build.upcycle import expert_tensors, router_rows, upcycle
from moekit.cli import app
from moekit.errors import MoekitError
from moekit.zoo.tiny import randomize_

COMMON = dict(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=256)
DENSE = {"qwen3": (Qwen3Config, dict(head_dim=8)), "mistral": (MistralConfig, {}), "llama": (LlamaConfig, {})}
MOE_OF = {"qwen3": "qwen3_moe", "mistral": "mixtral", "llama": "mixtral"}
IDS = torch.randint(3, 380, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    for name, (cls, extra) in DENSE.items():
        randomize_(AutoModelForCausalLM.from_config(cls(**COMMON, **extra))).save_pretrained(root / name)
    return root


def _logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits, model


@pytest.mark.parametrize("family", sorted(DENSE))
@pytest.mark.parametrize(("method", "options"), [("copy", dict(experts=8, top_k=2)),
                                                 ("virtual-groups", dict(experts=8, top_k=4, groups=2))])
def test_step_zero_reproduces_the_dense_logits(dense, tmp_path, family, method, options):
    report = upcycle(dense / family, out_dir=tmp_path / "moe", method=method, **options)
    expected, _ = _logits(dense / family)
    got, moe = _logits(tmp_path / "moe")
    assert moe.config.model_type == MOE_OF[family] == report["family"]
    assert (got - expected).abs().max().item() < 1e-4  # the bound; measured ~2e-6
    assert json.loads((tmp_path / "moe" / "upcycle.json").read_text())["method"] == method
    saved = json.loads((tmp_path / "moe" / "upcycle.json").read_text())
    assert report["max_abs_logit_difference"] == saved["max_abs_logit_difference"] < 1e-4  # measured, streamed


@pytest.mark.parametrize(("method", "options"), [("copy", dict(experts=4, top_k=2)),
                                                 ("virtual-groups", dict(experts=8, top_k=4, groups=2))])
def test_a_shared_expert_target_reproduces_the_dense_logits(dense, tmp_path, method, options):
    """GLM-4.5's DeepSeek-V3-style layer: sigmoid router, selection bias, shared expert."""
    report = upcycle(dense / "qwen3", out_dir=tmp_path / "moe", method=method, family="glm4_moe",
                     shared_fraction=0.3, **options)
    expected, _ = _logits(dense / "qwen3")
    got, moe = _logits(tmp_path / "moe")
    assert moe.config.model_type == "glm4_moe" and moe.config.n_shared_experts == options.get("groups", 1)
    block = moe.model.layers[0].mlp
    dense_model = AutoModelForCausalLM.from_pretrained(dense / "qwen3", dtype=torch.float32)
    torch.testing.assert_close(block.shared_experts.down_proj.weight,
                               dense_model.model.layers[0].mlp.down_proj.weight * 0.3)
    assert torch.equal(block.gate.e_score_correction_bias, torch.zeros(options["experts"]))
    assert (got - expected).abs().max().item() < 1e-4
    assert report["max_abs_logit_difference"] < 1e-4 and report["shared_expert_width"] == COMMON["intermediate_size"]


def test_virtual_group_routers_choose_whole_groups():
    """Equal rows within a group: top-k (a multiple of G) takes every shard equally often."""
    rows = router_rows(12, 16, method="virtual-groups", groups=3, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(100, 16) @ rows.T
    chosen = logits.topk(6, dim=-1).indices  # two whole groups of three
    shards = (chosen % 3).sort(dim=-1).values
    assert torch.equal(shards, torch.tensor([0, 0, 1, 1, 2, 2]).expand_as(shards))


def test_virtual_group_experts_partition_the_neurons_and_sum_to_the_mlp():
    gate, up, down = torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 12)
    gate_up, downs = expert_tensors(gate, up, down, experts=6, method="virtual-groups", groups=3, drop_ratio=0,
                                    generator=torch.Generator())
    x = torch.randn(5, 8)
    act = torch.nn.functional.silu
    mlp = (act(x @ gate.T) * (x @ up.T)) @ down.T
    shards = sum((act(x @ gate_up[j, :4].T) * (x @ gate_up[j, 4:].T)) @ downs[j].T for j in range(3))
    torch.testing.assert_close(shards / 3, mlp)  # each shard's down is scaled by G = 3


def test_drop_reinitialises_exactly_its_share_of_neurons():
    gate, up, down = torch.randn(40, 8), torch.randn(40, 8), torch.randn(8, 40)
    gate_up, downs = expert_tensors(gate, up, down, experts=4, method="drop", groups=1, drop_ratio=0.25,
                                    generator=torch.Generator().manual_seed(0))
    for j in range(4):
        changed = (gate_up[j, :40] != gate).any(dim=1)
        assert int(changed.sum()) == 10
        assert torch.equal(changed, (gate_up[j, 40:] != up).any(dim=1))
        assert torch.equal(changed, (downs[j] != down).any(dim=0))


@pytest.mark.parametrize(("args", "message"), [
    (["--experts", "2", "--top-k", "4"], "--top-k 4 must be between 1 and --experts 2"),
    (["--method", "virtual-groups", "--groups", "5"], "G = 5 does not"),
    (["--method", "fuse"], "--method 'fuse' is not one of"),
    (["--family", "mixtral"], "a qwen3 model cannot become 'mixtral'; choose --family qwen3_moe or glm4_moe"),
    (["--family", "glm4_moe", "--shared-fraction", "1"], "--shared-fraction 1.0 must be strictly between 0 and 1"),
])
def test_bad_input_is_refused_before_any_weight_is_read(dense, tmp_path, args, message):
    result = CliRunner().invoke(app, ["upcycle", str(dense / "qwen3"), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_an_moe_is_refused_as_one(dense, tmp_path):
    upcycle(dense / "qwen3", out_dir=tmp_path / "moe", experts=4, top_k=2)
    with pytest.raises(MoekitError, match="already an MoE"):
        upcycle(tmp_path / "moe", out_dir=tmp_path / "again", experts=4, top_k=2)
