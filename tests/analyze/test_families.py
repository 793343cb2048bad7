"""`moekit.analyze` on a tiny model of every supported family: every layer analysed, and
the numbers hold their invariants."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.analyze import analyze
from moekit.zoo.tiny import tiny_model

GEN = torch.Generator().manual_seed(3)
DATA = {"a": torch.randint(3, 200, (4, 128), generator=GEN), "b": torch.randint(150, 380, (4, 128), generator=GEN)}


def test_every_family(family):
    model = tiny_model(family)
    result = analyze(model, DATA, batch_size=4, progress=False)
    views = moekit.moe_layers(model)
    assert [layer["layer"] for layer in result.layers] == [v.index for v in views]
    T = 1024
    for view, layer in zip(views, result.layers):
        E, k = view.num_experts, view.top_k
        load = layer["load"]
        assert sum(load["count"]) == k * T and sum(load["share"]) == pytest.approx(1.0)
        assert sum(load["gate_share"]) == pytest.approx(1.0)
        assert 0 <= load["entropy_normalized"] <= 1 + 1e-9 and load["imbalance"] >= 1
        counts = torch.tensor(layer["coactivation"]["counts"])
        assert torch.equal(counts, counts.T) and counts.diagonal().tolist() == load["count"]
        assert sorted(layer["coactivation"]["order"]) == list(range(E))
        assert 0 <= layer["tokens"]["lookup_agreement"] <= 1
        assert sum(map(sum, layer["position"]["counts"])) == k * T
        assert [sum(c) for c in layer["domains"]["counts"]] == [k * 512, k * 512]
        if "from_previous" in layer:
            nxt = layer["from_previous"]
            assert 0 <= nxt["prefetch_recall"] <= 1 and 0 <= nxt["mutual_information_normalized"] <= 1 + 1e-9
            assert sum(map(sum, nxt["joint"])) == T * k * k
    assert "from_previous" not in result.layers[0]
    assert all("from_previous" in layer for layer in result.layers[1:])
