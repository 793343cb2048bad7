"""The routing_policy step inside `moekit.compress`: a calibrated target is met on the
calibration tokens by the model `moekit.load` restores (policy on), layer by layer; a given
parameter is recorded as is; a streamed evaluation routes as the loaded model does; bad
settings are refused before any weight is read."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.data.tokens import calibration_tokens
from moekit.io.tokenizer import tokenizer_for
from moekit.errors import MoekitError
from moekit.methods.dynamic.policy import SkipPolicy
from moekit.methods.dynamic.install import counting_expert_calls, routing_policy
from tests.checkpoints import write_checkpoints

FAMILIES = ["qwen3_moe", "deepseek_v3", "mixtral"]
CALIB = dict(n_samples=8, seq_len=32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("routing_policy"), FAMILIES, documents=4)


def _compress(sources, family, out, step):
    return moekit.compress(str(sources / family), {"steps": [step]}, out_dir=out, data=str(sources / "data"),
                           progress=False, **CALIB)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["skip", "threshold", "kmin_threshold"])
def test_a_calibrated_target_holds_for_the_model_moekit_load_restores(sources, tmp_path, family, policy):
    report = _compress(sources, family, tmp_path / "out", {"type": "routing_policy", "policy": policy,
                                                           "target_experts": 1.5})
    model = moekit.load(str(tmp_path / "out"))
    assert routing_policy(model).kind == policy
    rows = calibration_tokens(str(sources / "data"), tokenizer_for(str(sources / family)), **CALIB).input_ids
    with counting_expert_calls(model) as calls, torch.no_grad():
        model(rows)
    for layer, count in calls.per_layer().items():
        assert abs(count - 1.5) <= 0.02 * 1.5, f"layer {layer}: {count}"
    step_report = report["steps"][0]
    assert set(step_report["experts_per_token"]) == {str(i) for i in calls.per_layer()}


def test_a_given_parameter_is_recorded_and_the_weights_do_not_change(sources, tmp_path):
    _compress(sources, "qwen3_moe", tmp_path / "out", {"type": "routing_policy", "policy": "skip", "beta": 0.4})
    model, original = moekit.load(str(tmp_path / "out")), moekit.load(str(sources / "qwen3_moe"))
    layers = [layer.index for layer in moekit.moe_layers(model)]
    assert routing_policy(model) == SkipPolicy(beta=dict.fromkeys(layers, 0.4))
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_streamed_evaluation_routes_as_the_loaded_model(sources, tmp_path):
    from moekit.io.layered import LayeredModel

    _compress(sources, "deepseek_v3", tmp_path / "out", {"type": "routing_policy", "policy": "threshold",
                                                         "target_experts": 1.5})
    rows = calibration_tokens(str(sources / "data"), tokenizer_for(str(sources / "deepseek_v3")), **CALIB).input_ids
    options = dict(progress=False, context_length=32, stride=31)
    model = moekit.load(str(tmp_path / "out"))
    in_memory = moekit.evaluate(model, rows, **options)
    streamed = moekit.evaluate(LayeredModel.from_checkpoint(tmp_path / "out"), rows, **options)
    assert streamed.perplexity == pytest.approx(in_memory.perplexity, rel=1e-5)
    plain = moekit.evaluate(moekit.load(str(sources / "deepseek_v3")), rows, **options)
    assert plain.perplexity != pytest.approx(in_memory.perplexity, rel=1e-5)
    # experts per token: what the experts computed on the scored tokens (all but each row's last)
    with counting_expert_calls(model) as calls, torch.no_grad():
        model(rows[:, :-1])
    assert plain.experts_per_token == moekit.moe_layers(model)[0].top_k
    assert streamed.experts_per_token == pytest.approx(calls.overall(), abs=1e-9)
    assert {l.index: l.experts_per_token for l in streamed.layers} == pytest.approx(calls.per_layer(), abs=1e-9)


@pytest.mark.parametrize(("step", "message"), [
    ({"type": "routing_policy", "policy": "skip"}, "give exactly one of beta"),
    ({"type": "routing_policy", "policy": "skip", "beta": 0.3, "target_experts": 1.5}, "give exactly one of beta"),
    ({"type": "routing_policy", "policy": "skip", "p": 0.3}, "p is not a parameter of the skip policy"),
    ({"type": "routing_policy", "policy": "skip", "beta": 0.3, "kmin": 2}, "kmin belongs to the kmin_threshold"),
    ({"type": "routing_policy", "policy": "skip", "beta": 1.5}, "beta"),
    ({"type": "routing_policy", "policy": "threshold", "target_experts": 3.0}, "choose a target in that range"),
    ({"type": "routing_policy", "policy": "threshold", "target_fraction": 0.0}, "target_fraction"),
])
def test_bad_settings_are_refused_before_weights_load(sources, tmp_path, step, message):
    with pytest.raises(MoekitError, match=message):
        _compress(sources, "qwen3_moe", tmp_path / "out", step)
    assert not (tmp_path / "out").exists()


def test_prune_then_a_policy_compose(sources, tmp_path):
    moekit.compress(str(sources / "deepseek_v3"), {"steps": [
        {"type": "prune", "method": "frequency", "keep": 4},
        {"type": "routing_policy", "policy": "skip", "target_experts": 1.5}]},
        out_dir=tmp_path / "out", data=str(sources / "data"), progress=False, **CALIB)
    model = moekit.load(str(tmp_path / "out"))
    assert {layer.num_experts for layer in moekit.moe_layers(model)} == {4}
    rows = calibration_tokens(str(sources / "data"), tokenizer_for(str(sources / "deepseek_v3")), **CALIB).input_ids
    with counting_expert_calls(model) as calls, torch.no_grad():
        model(rows)
    assert all(abs(count - 1.5) <= 0.03 for count in calls.per_layer().values())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_global_parameter_meets_the_target_on_average(sources, tmp_path, family):
    report = _compress(sources, family, tmp_path / "out", {"type": "routing_policy", "policy": "skip",
                                                           "target_experts": 1.5, "scope": "global"})
    model = moekit.load(str(tmp_path / "out"))
    policy = routing_policy(model)
    assert len(set(policy.beta.values())) == 1  # one value for every layer
    rows = calibration_tokens(str(sources / "data"), tokenizer_for(str(sources / family)), **CALIB).input_ids
    with counting_expert_calls(model) as calls, torch.no_grad():
        model(rows)
    # set on the routing without policies; with them on, later layers see other inputs (measured: 1.47)
    assert abs(calls.overall() - 1.5) <= 0.05 * 1.5
    measured = report["steps"][0]["experts_per_token"]  # per layer, through the earlier layers' policies
    assert measured == pytest.approx({str(i): c for i, c in calls.per_layer().items()}, abs=1e-4)


def test_a_policy_rides_along_with_quantization(sources, tmp_path):
    moekit.compress(str(sources / "qwen3_moe"), {"steps": [
        {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 8},
        {"type": "routing_policy", "policy": "threshold", "p": 0.5}]},
        out_dir=tmp_path / "out", data=str(sources / "data"), progress=False, **CALIB)
    model = moekit.load(str(tmp_path / "out"))
    assert routing_policy(model).kind == "threshold"
    rows = calibration_tokens(str(sources / "data"), tokenizer_for(str(sources / "qwen3_moe")), **CALIB).input_ids
    with counting_expert_calls(model) as calls, torch.no_grad():
        model(rows)
    assert calls.overall() < moekit.moe_layers(model)[0].top_k


def test_the_skip_presets_are_the_best_policy_measured(tmp_path):
    """BENCHMARKS.md: top-p (threshold) had the smallest perplexity increase of the three
    policies at 75% and at 50% of the expert calls on ref-fine (on ref-coarse, top-2, the
    three rules coincide)."""
    from moekit.recipe import load_recipe

    for name, fraction in (("skip-75", 0.75), ("skip-50", 0.5)):
        (step,) = load_recipe(name).steps
        assert (step.type, step.policy, step.target_fraction, step.scope) == ("routing_policy", "threshold",
                                                                                fraction, "layer")


def test_compress_with_skip_50_writes_a_model_moekit_load_routes_with_half_the_experts(tmp_path):
    report = moekit.compress("moekit/ref-coarse", "skip-50", out_dir=tmp_path / "out", n_samples=4, seq_len=64,
                             progress=False)
    model = moekit.load(str(tmp_path / "out"))
    assert routing_policy(model).kind == "threshold"
    rows = calibration_tokens("stdlib:calib", tokenizer_for("moekit/ref-coarse"), n_samples=4, seq_len=64).input_ids
    with counting_expert_calls(model) as calls, torch.no_grad():
        model(rows)
    assert calls.overall() == pytest.approx(1.0, abs=0.02)
    # the report's experts per token are those the restored model computes on the same tokens
    assert (report["before"]["experts_per_token"], report["after"]["routing_policy"]) == (2, "threshold")
    assert report["after"]["experts_per_token"] == pytest.approx(calls.overall(), abs=1e-3)


def test_the_plan_says_what_a_policy_changes():
    planned = moekit.plan("moekit/ref-coarse", "skip-50")
    assert planned["after"]["active_params"] == planned["before"]["active_params"]
    assert any(note.startswith("routing_policy: every expert is kept") and "50% of each layer's top-k" in note
               for note in planned["notes"])
