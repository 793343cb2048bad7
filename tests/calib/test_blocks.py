"""The statistics that choose what to drop, computed in the layer-streamed planning pass,
equal brute-force computations on the whole model in memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moekit
from moekit.arch.edit import drop_mlp, set_top_k
from moekit.io.layered import LayeredModel
from moekit.recipe import Recipe
from moekit.recipe.passes import Collect, RecipePass
from moekit.recipe.phases import phases_of
from moekit.zoo.tiny import tiny_model
from tests.skipped_layer import SkippedLayer

IDS = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(2))
NAMES = frozenset({"frequency", "block_change", "mlp_change", "block_loss", "mlp_loss"})


def _streamed(family: str) -> dict:
    recipe = Recipe.from_dict({"steps": [{"type": "drop_blocks", "count": 1}]})
    lent = LayeredModel.in_memory(tiny_model(family))
    runner = RecipePass(lent, IDS, phases_of(recipe), plans={}, batch_size=3, seed=0, budget=None, stats_meta={})
    return runner.run(sink=Collect(0, NAMES)).collected.layers


def _change(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    return float((1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).mean())


def _loss(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model(IDS, labels=IDS).loss)


@pytest.mark.parametrize("family", ["qwen3_moe", "granitemoeshared"])  # a dense layer; a residual multiplier
def test_similarity_and_loss_scores_equal_brute_force(family):
    """1 − cos of each layer's input and output, and of the residual stream entering the
    MoE sublayer (the input of the norm before it) and the layer's output; the loss
    increase of the model run without each layer (sublayer)."""
    streamed = _streamed(family)
    model = tiny_model(family)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def block(_m, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, {}).update(x=x, y=out[0] if isinstance(out, tuple) else out)
        handles.append(layer.register_forward_hook(block, with_kwargs=True))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, args, i=i: seen.setdefault(i, {}).update(residual=args[0])))
    base = _loss(model)
    for handle in handles:
        handle.remove()
    moe = [layer.index for layer in moekit.moe_layers(model)]
    for i in range(len(model.model.layers)):
        assert float(streamed[i]["block_change"]) == pytest.approx(_change(seen[i]["x"], seen[i]["y"]), abs=1e-5)
        skipped = tiny_model(family)
        skipped.model.layers[i] = SkippedLayer(skipped.model.layers[i])
        assert float(streamed[i]["block_loss"]) == pytest.approx(_loss(skipped) - base, abs=1e-4)
        if i in moe:
            assert float(streamed[i]["mlp_change"]) == pytest.approx(
                _change(seen[i]["residual"], seen[i]["y"]), abs=1e-5)
            without = tiny_model(family)
            drop_mlp(without, [i])
            assert float(streamed[i]["mlp_loss"]) == pytest.approx(_loss(without) - base, abs=1e-4)
        else:
            assert "mlp_change" not in streamed[i] and "mlp_loss" not in streamed[i]


def test_topk_statistics_equal_the_block_run_with_fewer_experts():
    """topk_error[k-1] = Σ‖out_K − out_k‖² / Σ‖out_K‖² of the HF block (Mixtral: no shared
    expert, so the block's output is the routed output), out_k with the router set to k;
    topk_mass the router probability mass of the k best over the K best's."""
    model = tiny_model("olmoe")
    stats = moekit.calibrate(model, IDS, statistics=["topk_error", "topk_mass"], progress=False)
    inputs: dict[int, torch.Tensor] = {}
    handles = [layer.block.register_forward_pre_hook(lambda _m, args, i=layer.index: inputs.setdefault(i, args[0]))
               for layer in moekit.moe_layers(model)]
    with torch.no_grad():
        model(IDS)
    for handle in handles:
        handle.remove()
    for layer in moekit.moe_layers(model):
        x = inputs[layer.index]
        with torch.no_grad():
            full = layer.block(x).double()
            fewer = tiny_model("olmoe")
            set_top_k(fewer, {layer.index: 1})
            one = moekit.moe_layers(fewer)[layer.index].block(x).double()
        expected = float(((full - one) ** 2).sum() / (full**2).sum())
        got = stats[layer.index]["topk_error"]
        assert float(got[0]) == pytest.approx(expected, rel=1e-4) and float(got[1]) == 0
        with torch.no_grad():
            p = layer.router.probabilities(layer.router.logits(x.reshape(-1, x.shape[-1]))).double()
        top = p.topk(2, dim=-1).values.sum(0)
        assert float(stats[layer.index]["topk_mass"][0]) == pytest.approx(float(top[0] / top.sum()), rel=1e-5)
