"""Every statistic equals a brute-force computation that runs each expert on each token
through Hugging Face's own router and experts modules, with the formula written out."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.calib.calibrate import calibrate
from moekit.calib.observers import STATISTICS
from moekit.calib.stats import CalibrationStats
from moekit.errors import MoekitError
from moekit.zoo.tiny import tiny_model

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"]
IDS = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
ALL = sorted(set(STATISTICS) - {"hidden_sample"})


def _plain_block_inputs(model) -> dict[int, torch.Tensor]:
    """Input of every MoE block during one ordinary full forward."""
    captured, hooks = {}, []
    for layer in moekit.moe_layers(model):
        hooks.append(layer.block.register_forward_pre_hook(
            lambda _m, args, i=layer.index: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    return captured


def _hf_routing(layer, x):
    """(logits, top_k_weights, top_k_index) from the HF router module itself."""
    out = layer.router.module(x)
    if len(out) == 3:
        return out
    raise AssertionError("unexpected router output")


def _hf_expert_outputs(layer, x) -> torch.Tensor:
    """[E, T, H]: the HF experts module run for every expert on every token, weight 1."""
    T = x.shape[0]
    outs = []
    for j in range(layer.num_experts):
        index = torch.full((T, 1), j, dtype=torch.long)
        outs.append(layer.experts.module(x, index, torch.ones(T, 1)))
    return torch.stack(outs).double()


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    model = tiny_model(request.param)
    stats = calibrate(model, IDS, statistics=ALL, batch_size=len(IDS), progress=False)
    return model, stats, _plain_block_inputs(model)


def test_statistics_equal_brute_force(case):
    model, stats, inputs = case
    for layer in moekit.moe_layers(model):
        x = inputs[layer.index]
        with torch.no_grad():
            logits, weights, index = _hf_routing(layer, x)
            f = _hf_expert_outputs(layer, x)  # [E, T, H]
        logits, weights = logits.double(), weights.double()
        E, T = layer.num_experts, x.shape[0]
        chosen = torch.zeros(T, E, dtype=torch.float64)
        weight_of = torch.zeros(T, E, dtype=torch.float64)
        for t in range(T):
            for slot in range(layer.top_k):
                chosen[t, index[t, slot]] = 1.0
                weight_of[t, index[t, slot]] = weights[t, slot]
        norms = f.norm(dim=-1).T  # [T, E]
        count = chosen.sum(0)
        if layer.router.spec.scoring == "sigmoid":
            probs = torch.sigmoid(logits)
        else:
            probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        expected = {
            "frequency": count,
            "soft_frequency": probs.sum(0),
            "reap": (weight_of * norms).sum(0) / count.clamp(min=1),
            "ean": (chosen * norms).sum(0),
            "man": (chosen * norms).sum(0) / count.clamp(min=1),
            "msan": (chosen * norms**2).sum(0) / count.clamp(min=1),
            "peak": torch.stack([(f[j].abs().max(-1).values * chosen[:, j]).max() for j in range(E)]),
            "coactivation": chosen.T @ chosen,
            "logit_similarity": torch.stack([torch.stack([
                logits[:, i] @ logits[:, j] / (logits[:, i].norm() * logits[:, j].norm()) for j in range(E)])
                for i in range(E)]),
            "mean_output": f.mean(1),
        }
        got = stats[layer.index]
        assert stats.tokens[layer.index] == T
        for name, value in expected.items():
            assert torch.allclose(got[name].double(), value, rtol=1e-4, atol=1e-5), (layer.index, name)


def test_stats_round_trip_and_refuse_other_model_or_data(case, tmp_path):
    model, stats, _ = case
    stats.save(tmp_path / "stats")
    again = CalibrationStats.load(tmp_path / "stats", model=model, input_ids=IDS)
    assert again.meta["model_fingerprint"] == stats.meta["model_fingerprint"]
    for index, layer_stats in stats.layers.items():
        for name, tensor in layer_stats.items():
            assert torch.equal(again[index][name], tensor)
    assert again.tokens == stats.tokens
    with pytest.raises(MoekitError, match="another model"):
        CalibrationStats.load(tmp_path / "stats", model=tiny_model("olmoe"))
    with pytest.raises(MoekitError, match="other calibration data"):
        CalibrationStats.load(tmp_path / "stats", input_ids=IDS[:3])
    with pytest.raises(MoekitError, match="already exists"):
        stats.save(tmp_path / "stats")
    (tmp_path / "stats" / "stats.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(MoekitError, match=r"stats\.safetensors is not readable.*calibrate again"):
        CalibrationStats.load(tmp_path / "stats")
    (tmp_path / "stats" / "stats.json").write_text("{ nope")
    with pytest.raises(MoekitError, match=r"stats\.json is not valid JSON"):
        CalibrationStats.load(tmp_path / "stats")


def test_unrouted_experts_get_zeros_not_nan():
    model = tiny_model("gpt_oss")
    layer = moekit.moe_layers(model)[0]
    with torch.no_grad():
        layer.router.bias[5] = -1e4  # expert 5 is never chosen
    stats = calibrate(model, IDS, statistics=ALL, progress=False)
    s = stats[layer.index]
    assert s["frequency"][5] == 0
    for name in ("reap", "man", "msan", "ean", "peak"):
        assert s[name][5] == 0 and torch.isfinite(s[name]).all()


def test_hidden_sample_is_bounded_seeded_and_batch_independent():
    model = tiny_model("qwen3_moe")
    a = calibrate(model, IDS, statistics=["hidden_sample"], hidden_sample=10, batch_size=2, progress=False)
    b = calibrate(model, IDS, statistics=["hidden_sample"], hidden_sample=10, batch_size=5, seed=0, progress=False)
    c = calibrate(model, IDS, statistics=["hidden_sample"], hidden_sample=10, batch_size=2, seed=1, progress=False)
    inputs = _plain_block_inputs(model)
    for index in a.layers:
        sample = a[index]["hidden_sample"]
        assert sample.shape == (10, model.config.hidden_size)
        assert torch.allclose(sample, b[index]["hidden_sample"], atol=1e-5)
        assert not torch.allclose(sample, c[index]["hidden_sample"])
        distance = torch.cdist(sample, inputs[index], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        assert (distance < 1e-4).all()  # every sampled row is one of the layer's inputs


def test_only_requested_statistics_are_computed():
    stats = calibrate(tiny_model("olmoe"), IDS, statistics=["reap"], progress=False)
    assert set(stats[0]) == {"frequency", "reap"}
    with pytest.raises(MoekitError, match="mean_output"):
        stats.require({"mean_output"}, "HC-SMoE grouping")


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.zeros(0, 16, dtype=torch.long), "non-empty"),
        (torch.randint(3, 128, (2, 257)), "beyond the model's 256 positions"),
        (torch.full((2, 8), 500), "vocabulary"),
    ],
)
def test_bad_data_is_refused(ids, message):
    with pytest.raises(MoekitError, match=message):
        calibrate(tiny_model("mixtral"), ids, progress=False)


def test_unknown_statistic():
    with pytest.raises(MoekitError, match="unknown statistics"):
        calibrate(tiny_model("mixtral"), IDS, statistics=["vibes"], progress=False)
