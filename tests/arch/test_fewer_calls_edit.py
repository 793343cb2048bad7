"""`set_top_k`, `drop_mlp`, `drop_blocks`: what they refuse, and what the model becomes."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.arch.edit import drop_blocks, drop_mlp, set_top_k
from moekit.errors import MoekitError
from moekit.eval.speed import decode_step, returned_cache
from moekit.zoo.tiny import tiny_model
from tests.skipped_layer import SkippedLayer

IDS = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(3))


def test_set_top_k_refuses_bad_k_and_dense_layers():
    model = tiny_model("qwen3_moe")  # MoE layers 0 and 2, top-k 2
    for bad, message in [({0: 3}, "outside 1..2"), ({0: 0}, "outside 1..2"), ({1: 1}, "no routed experts")]:
        with pytest.raises(MoekitError, match=message):
            set_top_k(model, bad)
    assert model.config.num_experts_per_tok == 2 and not hasattr(model.config, "moekit_top_k_per_layer")


def test_per_layer_top_k_is_what_the_hf_router_and_the_view_use():
    model = tiny_model("deepseek_v3")  # sigmoid scores, correction bias, groups, renormalised, scaled
    set_top_k(model, {1: 1})
    assert model.config.moekit_top_k_per_layer == {"1": 1, "2": 2} and model.config.num_experts_per_tok == 2
    layer = moekit.moe_layers(model)[0]
    x = torch.randn(7, layer.experts.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, _, index, weights = layer.forward(x)
        torch.testing.assert_close(layer.block(x[None])[0], reference, rtol=0, atol=1e-5)
    assert index.shape == (7, 1) and torch.allclose(weights, torch.full_like(weights, 2.5))  # renormalised × 2.5
    set_top_k(model, {2: 1})  # one k again: a standard config says it
    assert model.config.num_experts_per_tok == 1 and not hasattr(model.config, "moekit_top_k_per_layer")


def test_drop_mlp_keeps_attention_and_refuses_leaving_no_moe():
    model = tiny_model("granitemoeshared")  # a shared MLP beside the block goes too
    with pytest.raises(MoekitError, match="leaves no MoE"):
        drop_mlp(model, [0, 1, 2])
    with pytest.raises(MoekitError, match="no routed experts"):
        drop_mlp(model, [5])
    before = sum(p.numel() for p in model.model.layers[1].parameters())
    drop_mlp(model, [1])
    assert model.config.moekit_dropped_mlp_layers == [1]
    assert [layer.index for layer in moekit.moe_layers(model)] == [0, 2]
    kept = dict(model.model.layers[1].named_parameters())
    assert kept and all("block_sparse_moe" not in n and "shared_mlp" not in n for n in kept)
    assert sum(p.numel() for p in kept.values()) < before
    with pytest.raises(MoekitError, match="moekit_dropped_mlp_layers"):
        moekit.save(model, "never-written")


def test_drop_blocks_renumbers_the_cache_and_the_config():
    model = tiny_model("llama4")  # MoE layers [0, 2] by an explicit list; per-layer RoPE
    drop_blocks(model, [1])
    assert model.config.num_hidden_layers == 2 and model.config.moe_layers == [0, 1]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    with torch.no_grad():  # generation with a cache uses the renumbered cache slots
        full = model(IDS).logits[:, -1]
        out = model(IDS[:, :-1], use_cache=True)
        step = decode_step(model, IDS[:, -1:], returned_cache(out))[0].logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)


def test_drop_blocks_renumbers_a_per_layer_routing_policy(tmp_path):
    policy = {"kind": "skip", "beta": {0: 0.9, 2: 0.0}}
    model = tiny_model("qwen3_moe")
    moekit.set_routing_policy(model, policy)
    drop_blocks(model, [1])
    assert model.config.moekit_routing_policy["beta"] == {"0": 0.9, "1": 0.0}
    reference = tiny_model("qwen3_moe")  # the original, with the policy, run without layer 1
    moekit.set_routing_policy(reference, policy)
    reference.model.layers[1] = SkippedLayer(reference.model.layers[1])
    reloaded = moekit.load(moekit.save(model, tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-6)
