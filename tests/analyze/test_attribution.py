"""Attribution equals the loss of a model from which the expert was really removed
(`moekit.keep_experts`), computed by an ordinary full forward."""

from __future__ import annotations

import copy

import pytest
import torch

import moekit
from moekit.analyze import analyze
from moekit.analyze.attribution import masked
from moekit.zoo.tiny import tiny_model

GEN = torch.Generator().manual_seed(2)
DATA = {"focus": torch.randint(3, 380, (8, 64), generator=GEN), "other": torch.randint(3, 380, (8, 64), generator=GEN)}


def _loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.double()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "gpt_oss", "llama4"])  # keep_experts: no groups
def test_masked_loss_equals_removing_the_expert(family):
    model = tiny_model(family)
    result = analyze(model, DATA, focus="focus", candidates=3, progress=False)
    att = result.attribution
    assert att["corpus"] == "focus" and len(att["experts"]) == 3
    assert att["loss"] == pytest.approx(_loss(model, DATA["focus"]), abs=1e-4)
    for measured in att["experts"]:
        pruned = copy.deepcopy(model)
        layer = next(lay for lay in moekit.moe_layers(pruned) if lay.index == measured["layer"])
        moekit.keep_experts(pruned, {layer.index: [j for j in range(layer.num_experts) if j != measured["expert"]]})
        assert measured["loss"] == pytest.approx(_loss(pruned, DATA["focus"]), abs=1e-4)
        assert measured["increase"] == pytest.approx(measured["loss"] - att["loss"])
    assert [m["increase"] for m in att["experts"]] == sorted((m["increase"] for m in att["experts"]), reverse=True)
    # the candidates are the experts with the largest share of the focus corpus's selections
    shares = [(c / sum(layer["domains"]["counts"][0]) * layer["num_experts"], layer["layer"], j)
              for layer in result.layers for j, c in enumerate(layer["domains"]["counts"][0])]
    best = {(lay, j) for _, lay, j in sorted(shares, key=lambda s: (-s[0], s[1], s[2]))[:3]}
    assert {(m["layer"], m["expert"]) for m in att["experts"]} == best


def test_masking_nothing_changes_nothing():
    """The masked block is the canonical forward: with an expert that no token chooses, the
    block's output is the family's own."""
    model = tiny_model("mixtral")
    layer = moekit.moe_layers(model)[0]
    x = torch.randn(1, 2, layer.experts.hidden_size, generator=GEN)  # 2 tokens choose at most 4 of 8
    with torch.no_grad():
        plain = layer.block(x)
        plain = plain[0] if isinstance(plain, tuple) else plain
        _, _, index, _ = layer.forward(x.reshape(-1, x.shape[-1]))
        unused = next(j for j in range(layer.num_experts) if j not in index.unique().tolist())
        with masked(layer, unused):
            out = layer.block(x)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
