"""FactoredExperts: computes what the family's own experts compute with the products as
weights (every family decompose supports), really with fewer FLOPs, counts its true
parameters in `moekit.summarize`, skips the "no expert" sentinel, and `moekit.materialize`
turns it back into the family's own module."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moekit
from moekit.arch.factored import FactoredExperts, install, is_factored
from moekit.zoo.tiny import tiny_model
from tests.conftest import FAMILIES

SUPPORTED = [f for f in FAMILIES if f not in ("gpt_oss", "llama4")]


def _random_factored(layer, rank: int, base: bool, seed: int = 0) -> FactoredExperts:
    experts = layer.experts
    module = FactoredExperts(num_experts=layer.num_experts, hidden_size=experts.hidden_size,
                             intermediate_size=experts.intermediate_size,
                             gate_up_ranks=[rank + j % 3 for j in range(layer.num_experts)],
                             down_ranks=[max(0, rank - j % 2) for j in range(layer.num_experts)], base=base,
                             act_fn=experts.activation)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return module


@pytest.mark.parametrize("family", SUPPORTED)
@pytest.mark.parametrize("base", [False, True])
def test_the_block_computes_the_products(family, base):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    layer = moekit.moe_layers(model)[0]
    factored = _random_factored(layer, rank=3, base=base)
    products = (factored.gate_up_proj.detach().clone(), factored.down_proj.detach().clone())
    reference = tiny_model(family)
    with torch.no_grad():  # the family's own module, holding the products
        moekit.moe_layers(reference)[0].experts.module.gate_up_proj.copy_(products[0])
        moekit.moe_layers(reference)[0].experts.module.down_proj.copy_(products[1])
        expected = reference(ids).logits
    install(model, layer.index, factored)
    view = moekit.moe_layers(model)[0]
    assert is_factored(view.experts.module) and view.num_experts == layer.num_experts
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
        hidden = torch.randn(7, view.experts.hidden_size)
        out, *_ = view.forward(hidden)  # the canonical reference forward reads the products
        ref_out, *_ = moekit.moe_layers(reference)[0].forward(hidden)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)


def test_the_factors_cost_fewer_flops_and_the_sentinel_is_skipped():
    model = tiny_model("qwen3_moe")
    layer = moekit.moe_layers(model)[0]
    hidden = torch.randn(64, layer.experts.hidden_size)
    index = torch.randint(0, layer.num_experts, (64, layer.top_k), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(64, layer.top_k)
    factored = _random_factored(layer, rank=2, base=False)

    def flops(module, idx):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(hidden, idx, weights)
        return counter.get_total_flops()

    # transformers' grouped_mm runs as a custom op the counter does not see: count the dense
    # experts' multiply-adds directly (2 FLOPs each), token by token and choice by choice
    H, I = layer.experts.hidden_size, layer.experts.intermediate_size
    dense = 2 * index.numel() * (2 * I * H + H * I)
    assert flops(factored, index) < 0.5 * dense
    # slots routed to expert E are not computed and add nothing
    dropped = index.clone()
    dropped[:, 1:] = layer.num_experts
    with torch.no_grad():
        kept_only = factored(hidden, index[:, :1], weights[:, :1])
        torch.testing.assert_close(factored(hidden, dropped, weights), kept_only)
    assert flops(factored, dropped) < flops(factored, index)


def test_summarize_counts_the_factors_and_the_always_active_bases(tmp_path):
    model = tiny_model("mixtral")
    for layer in moekit.moe_layers(model):
        install(model, layer.index, _random_factored(layer, rank=2, base=True))
    summary = moekit.summarize(model)
    total = sum(p.numel() for p in model.parameters())
    assert summary.total_params == total
    routed = active = 0
    for layer in moekit.moe_layers(model):
        module = layer.experts.module
        bases = module.gate_up_base.numel() + module.down_base.numel()
        own = sum(p.numel() for p in module.parameters())
        routed += own
        active += bases + (own - bases) * layer.top_k / layer.num_experts
    assert summary.routed_params == routed
    assert summary.active_params == total - routed + round(active)
    moe = [layer for layer in summary.layers if layer.kind == "moe"]
    assert all(layer.factored == {"mean_rank_gate_up": 2.88, "mean_rank_down": 1.5, "shared_base": True}
               for layer in moe)  # ranks 2, 3, 4, 2, … (23 / 8) and 2, 1, 2, … of `_random_factored`


def test_materialize_gives_back_the_family_module_with_the_products():
    model = tiny_model("olmoe")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    for layer in moekit.moe_layers(model):
        install(model, layer.index, _random_factored(layer, rank=2, base=True))
    with torch.no_grad():
        factored = model(ids).logits
    assert getattr(model.config, "moekit_factored_experts")
    moekit.materialize(model)
    assert not hasattr(model.config, "moekit_factored_experts")
    assert not any(is_factored(layer.experts.module) for layer in moekit.moe_layers(model))
    assert isinstance(moekit.moe_layers(model)[0].experts.module.gate_up_proj, torch.nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, factored, rtol=1e-4, atol=1e-5)


def test_a_routing_policy_routes_factored_experts_as_it_routes_their_products():
    from moekit.methods.dynamic.policy import ThresholdPolicy
    from moekit.methods.dynamic.install import counting_expert_calls

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    factored = tiny_model("deepseek_v3")
    for layer in moekit.moe_layers(factored):
        install(factored, layer.index, _random_factored(layer, rank=3, base=True, seed=layer.index))
    dense = tiny_model("deepseek_v3")
    for layer, twin in zip(moekit.moe_layers(factored), moekit.moe_layers(dense), strict=True):
        with torch.no_grad():
            twin.experts.module.gate_up_proj.copy_(layer.experts.module.gate_up_proj)
            twin.experts.module.down_proj.copy_(layer.experts.module.down_proj)
    for model in (factored, dense):
        moekit.set_routing_policy(model, ThresholdPolicy(p=0.5))
    with torch.no_grad(), counting_expert_calls(factored) as calls:
        out = factored(ids).logits
    assert calls.overall() < moekit.moe_layers(factored)[0].top_k
    with torch.no_grad():
        torch.testing.assert_close(out, dense(ids).logits, rtol=1e-4, atol=1e-5)
