"""Splitting: the experts partition the neurons exactly once and together compute the dense
MLP; a split model with every expert active and an even router gives the dense logits
through plain transformers; the router fit reaches the oracle's choice on a layer built to
have one; bad input is refused before any weight is read."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config
from typer.testing import CliRunner

from moekit.build.split import expert_outputs, fit_router, partition, split
from moekit.cli import app
from moekit.zoo.tiny import TINY_TOKENIZER_DIR, randomize_
from tests.checkpoints import write_checkpoints

IDS = torch.randint(3, 280, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny dense Qwen3 with a tokenizer and a small corpus beside it."""
    from moekit.data.tokenizer import load_tokenizer, save_tokenizer

    root = write_checkpoints(tmp_path_factory.mktemp("split"), [], documents=3)
    config = Qwen3Config(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=256)
    randomize_(AutoModelForCausalLM.from_config(config)).save_pretrained(root / "dense")
    save_tokenizer(load_tokenizer(TINY_TOKENIZER_DIR), root / "dense")
    return root


@pytest.mark.parametrize("by", ["random", "cluster", "coactivation"])
def test_experts_partition_the_neurons_and_sum_to_the_mlp(by):
    gate, up, down = torch.randn(24, 8), torch.randn(24, 8), torch.randn(8, 24)
    x = torch.randn(10, 8)
    activations = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    groups = partition(gate, up, 4, by=by, generator=torch.Generator().manual_seed(0), activations=activations)
    assert sorted(torch.cat(groups).tolist()) == list(range(24)) and {len(g) for g in groups} == {6}
    mlp = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(expert_outputs(x, gate, up, down, groups).sum(0), mlp)


def test_clustering_groups_neurons_that_read_alike():
    """Neurons built as noisy copies of 4 directions are grouped by direction."""
    directions = torch.randn(4, 16)
    gate = directions.repeat_interleave(5, dim=0) + 0.01 * torch.randn(20, 16)
    groups = partition(gate, gate.clone(), 4, by="cluster", generator=torch.Generator().manual_seed(1))
    assert sorted(tuple((g // 5).unique().tolist()) for g in groups) == [(0,), (1,), (2,), (3,)]


def test_coactivation_groups_neurons_that_fire_together():
    """Tokens of kind b excite neurons 6b..6b+5 (in a shuffled order): those form one expert."""
    order = torch.randperm(24, generator=torch.Generator().manual_seed(2))
    kinds = torch.arange(120) % 4
    block = torch.zeros(120, 24)
    for b in range(4):
        block[(kinds == b).nonzero(), order[6 * b:6 * (b + 1)]] = 1.0
    activations = block + 0.01 * torch.randn(120, 24)
    groups = partition(torch.randn(24, 8), torch.randn(24, 8), 4, by="coactivation",
                       generator=torch.Generator().manual_seed(0), activations=activations)
    expected = sorted(sorted(order[6 * b:6 * (b + 1)].tolist()) for b in range(4))
    assert sorted(g.tolist() for g in groups) == expected


def test_the_router_fit_picks_the_experts_with_the_largest_outputs():
    """Expert e answers only to inputs along its own axis: the fitted router's top-1 is it."""
    x = torch.eye(4).repeat(50, 1) * torch.rand(200, 1).add(0.5)
    outputs = torch.stack([x[:, e:e + 1].abs() * torch.ones(200, 3) for e in range(4)])  # [E, N, H]
    router = fit_router(x, outputs)
    assert torch.equal((x @ router.T).argmax(-1), x.argmax(-1))


def test_a_split_model_with_every_expert_and_an_even_router_computes_the_dense_logits(dense, tmp_path):
    report = split(dense / "dense", out_dir=tmp_path / "moe", experts=4, top_k=4, by="cluster",
                   data=str(dense / "data"), n_samples=4, seq_len=32)
    assert set(report["layers"]) == {"0", "1"}
    assert all(0.999 < layer["oracle_share"] <= 1.0 + 1e-6 for layer in report["layers"].values())
    original = AutoModelForCausalLM.from_pretrained(dense / "dense", dtype=torch.float32)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    for layer in moe.model.layers:  # equal logits: every expert weighs 1/E, times the E in its down projection
        layer.mlp.gate.weight.data.zero_()
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, original(IDS).logits, rtol=0, atol=1e-4)


def test_bad_input_is_refused_before_any_weight_is_read(dense, tmp_path):
    result = CliRunner().invoke(app, ["split", str(dense / "dense"), "-o", str(tmp_path / "out"), "--experts", "5"])
    assert result.exit_code == 2 and "--experts 5 must divide the MLP width 48" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
