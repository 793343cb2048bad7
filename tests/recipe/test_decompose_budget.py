"""``decompose`` with ``budget: global``: the layers share the uniform budget's parameters,
the layer whose spectrum is flattest gets more rank and the summed calibration error is no
worse, and a streamed compress writes the sizes `moekit.plan` shows."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.calib.calibrate import calibrate
from moekit.recipe.steps.decompose import Decompose
from moekit.zoo.tiny import tiny_model
from tests.checkpoints import write_checkpoints

IDS = torch.randint(3, 300, (8, 24), generator=torch.Generator().manual_seed(0))


def _steep_after_first():
    """A tiny model whose MoE layers after the first have steeply decaying singular values
    (halving from one to the next): the first layer's flat spectrum needs more rank."""
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        for layer in moekit.moe_layers(model)[1:]:
            for p in layer.experts.module.parameters():
                u, s, vh = torch.linalg.svd(p, full_matrices=False)
                p.copy_(u @ torch.diag_embed(s * 0.5 ** torch.arange(s.shape[-1])) @ vh)
    return model


def test_the_layers_share_the_uniform_budget_where_it_removes_most_error():
    reports = {}
    for budget in ("uniform", "global"):
        model = _steep_after_first()
        step = Decompose(keep_params=0.5, budget=budget)
        stats = calibrate(model, IDS, statistics=step.needs(), hidden_sample=step.hidden_sample(), progress=False)
        reports[budget] = step.apply(model, stats)
        held = sum(p.numel() for layer in moekit.moe_layers(model) for p in layer.experts.module.parameters())
        assert held == sum(reports[budget]["params_after"].values())
    uniform, global_ = reports["uniform"], reports["global"]
    assert sum(global_["params_after"].values()) == sum(uniform["params_after"].values())  # met model-wide exactly
    first = min(global_["gate_up_ranks"], key=int)
    for kind in ("gate_up_ranks", "down_ranks"):
        assert sum(global_[kind][first]) > sum(uniform[kind][first])

    def total(report):
        return sum(e["gate_up"] + e["down"] for e in report["relative_error"].values())

    assert total(global_) <= total(uniform) / 1.5


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("decompose-budget"), ["qwen3_moe"], documents=3)


def test_a_streamed_compress_writes_the_planned_sizes(sources, tmp_path):
    """The planning pass measures each lent layer, the edit pass spends what it planned:
    parameters exactly the uniform budget's, as `moekit.plan` shows before any weight loads."""
    after = {}
    for budget in ("uniform", "global"):
        step = {"type": "decompose", "keep_params": 0.5, "budget": budget}
        report = moekit.compress(str(sources / "qwen3_moe"), {"steps": [step]}, out_dir=tmp_path / budget,
                                 data=str(sources / "data"), progress=False, n_samples=4, seq_len=32,
                                 dtype="float32")
        planned = moekit.plan(str(sources / "qwen3_moe"), {"steps": [step]}, dtype="float32")["after"]
        assert planned == report["after"]
        assert moekit.summarize(moekit.load(str(tmp_path / budget))).routed_params == planned["routed_params"]
        after[budget] = report["after"]
        if budget == "global":  # each layer's (gate/up, down) rank units, from the planning pass
            assert len({tuple(units) for units in report["steps"][0]["rank_units"].values()}) > 1
    assert after["global"] == after["uniform"]
