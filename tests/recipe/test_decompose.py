"""The ``decompose`` step: full rank reproduces every layer, activation-aware SVD beats
plain SVD on the calibration inputs, the budget is met, the moekit format round-trips with
equal logits, a materialized output loads in plain transformers with the factored model's
logits, it composes with pruning, and bad input is refused before any weight is read."""

from __future__ import annotations


import pytest
import torch

import moekit
from moekit.arch.factored import is_factored
from moekit.calib.calibrate import calibrate
from moekit.errors import MoekitError
from moekit.io.save import atomic_dir, write_checkpoint
from moekit.recipe.steps.decompose import Decompose
from moekit.zoo.tiny import tiny_model
from tests.checkpoints import write_checkpoints
from tests.conftest import FAMILIES
from tests.reload import plain_logits

SUPPORTED = [f for f in FAMILIES if f not in ("gpt_oss", "llama4")]
IDS = torch.randint(3, 300, (8, 24), generator=torch.Generator().manual_seed(0))
CALIB = dict(n_samples=4, seq_len=32)


def _decomposed(family: str, **settings):
    model = tiny_model(family)
    step = Decompose(**settings)
    stats = calibrate(model, IDS, statistics=step.needs(), hidden_sample=step.hidden_sample(), progress=False)
    return model, step.apply(model, stats)


@pytest.mark.parametrize("family", SUPPORTED)
@pytest.mark.parametrize("method", ["svd", "shared_basis"])
def test_full_rank_reproduces_every_layer(family, method):
    with torch.no_grad():
        expected = tiny_model(family)(IDS).logits
    model, _ = _decomposed(family, method=method, rank=10**6, damp=0.0)
    assert all(is_factored(layer.experts.module) for layer in moekit.moe_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-4, atol=1e-4)  # fp32 rounding only


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
@torch.no_grad()
def test_activation_aware_error_on_the_calibration_inputs_is_never_worse_than_plain(family):
    """Each expert's gate/up and down on the inputs the layer routes to it, weighted by
    their routing weights (what the step whitens by), at every rank."""
    from moekit.methods.lowrank.svd import factorize, weighted_error

    model = tiny_model(family)
    stats = calibrate(model, IDS, statistics={"hidden_sample"}, hidden_sample=4096, progress=False)
    for layer in moekit.moe_layers(model):
        x = stats.hidden_inputs(layer.index, 4096)
        index, weights = layer.router.route(layer.router.logits(x))
        for j in range(layer.num_experts):
            token, slot = torch.where(index == j)
            g = weights[token, slot, None].double()
            h = layer.experts.intermediate(j, x[token])
            for weight, inputs in ((layer.experts.gate_up[j], x[token]), (layer.experts.down[j], h)):
                cov = (inputs.double() * g).T @ (inputs.double() * g)
                aware, plain = factorize(weight.detach(), cov, damp=0.01), factorize(weight.detach())
                for rank in range(1, min(weight.shape) + 1):
                    errors = [weighted_error(weight.detach(), b @ a, cov) for b, a in
                              (aware.truncated(rank), plain.truncated(rank))]
                    assert errors[0] <= errors[1] * (1 + 1e-6) + 1e-9, (layer.index, j, rank)


@pytest.mark.parametrize("family", SUPPORTED)
@pytest.mark.parametrize("settings", [dict(keep_params=0.5), dict(keep_params=0.3, allocation="uniform"),
                                      dict(keep_params=0.6, method="shared_basis", refit=True)])
def test_the_budget_is_met(family, settings):
    """Each layer keeps at most keep_params of its routed parameters, and less than one
    more rank of each projection short of it; the summary counts what the layer holds."""
    before = {layer.index: sum(p.numel() for p in layer.experts.module.parameters())
              for layer in moekit.moe_layers(tiny_model(family))}
    model, report = _decomposed(family, **settings)
    for layer in moekit.moe_layers(model):
        E, H, I = layer.num_experts, layer.experts.hidden_size, layer.experts.intermediate_size
        held = sum(p.numel() for p in layer.experts.module.parameters())
        budget = sum(int(settings["keep_params"] * E * o * i) for o, i in ((2 * I, H), (H, I)))
        assert budget - (2 * I + H) - (H + I) < held <= budget
        assert report["params_after"][str(layer.index)] == held
        assert report["params_before"][str(layer.index)] == before[layer.index]
    assert moekit.summarize(model).routed_params == sum(report["params_after"].values())


@pytest.mark.parametrize("family", SUPPORTED)
def test_the_moekit_format_round_trips_with_equal_logits(family, tmp_path):
    model, _ = _decomposed(family, keep_params=0.5, method="shared_basis" if family == "mixtral" else "svd")
    with atomic_dir(tmp_path / "out") as folder:
        assert write_checkpoint(model, folder) == "moekit-nonuniform"
    loaded = moekit.load(str(tmp_path / "out"))
    assert all(is_factored(layer.experts.module) for layer in moekit.moe_layers(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert moekit.summarize(loaded).total_params == moekit.summarize(model).total_params
    with pytest.raises(MoekitError, match="materialize"):  # no standard checkpoint of factored experts
        moekit.save(model, tmp_path / "standard")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("decompose"), ["qwen3_moe", "mixtral"], documents=3)


def _compress(sources, family, out, *steps, **options):
    return moekit.compress(str(sources / family), {"steps": list(steps)}, out_dir=out, data=str(sources / "data"),
                           progress=False, **CALIB, **options)


def test_compress_writes_factors_and_a_materialized_output_loads_in_plain_transformers(sources, tmp_path):
    """Through the layer stream: the factored output is moekit's format with the planned
    sizes, its streamed evaluation is the loaded model's, and materialize: true writes a
    standard checkpoint whose plain-transformers logits are the factored model's."""
    from moekit.io.layered import LayeredModel

    step = {"type": "decompose", "keep_params": 0.5, "refit": True}
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    factored_logits, standard = [], []
    for family in ("qwen3_moe", "mixtral"):
        report = _compress(sources, family, tmp_path / family, step, evaluate=True, eval_data=str(sources / "data"),
                           dtype="float32")
        assert report["format"] == "moekit-factored"
        planned = moekit.plan(str(sources / family), {"steps": [step]}, dtype="float32")["after"]
        assert planned == {key: value for key, value in report["after"].items() if key != "eval"}  # exact
        model = moekit.load(str(tmp_path / family))
        assert moekit.summarize(model).routed_params == report["after"]["routed_params"]
        rows = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(1))
        options = dict(progress=False, context_length=17, stride=16)
        streamed = moekit.evaluate(LayeredModel.from_checkpoint(tmp_path / family), rows, **options)
        assert streamed.perplexity == pytest.approx(moekit.evaluate(model, rows, **options).perplexity, rel=1e-6)
        with torch.no_grad():
            factored_logits.append(model(ids).logits)
        report = _compress(sources, family, tmp_path / f"{family}-std", {**step, "materialize": True}, dtype="float32")
        assert report["format"] == "standard"
        standard.append(tmp_path / f"{family}-std")
    for plain, factored in zip(plain_logits(tmp_path, standard, ids), factored_logits):
        torch.testing.assert_close(plain, factored, rtol=1e-4, atol=1e-4)


def test_it_follows_pruning_and_materialized_it_can_be_quantized(sources, tmp_path):
    report = _compress(sources, "qwen3_moe", tmp_path / "a", {"type": "prune", "method": "reap", "remove": 0.5},
                       {"type": "decompose", "keep_params": 0.5, "method": "shared_basis"})
    model = moekit.load(str(tmp_path / "a"))
    layers = moekit.moe_layers(model)
    assert all(is_factored(layer.experts.module) and layer.num_experts == 4 for layer in layers)
    assert report["after"]["routed_params"] <= report["before"]["routed_params"] / 4
    report = _compress(sources, "qwen3_moe", tmp_path / "b",
                       {"type": "decompose", "keep_params": 0.5, "materialize": True},
                       {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 16})
    assert report["format"] == "compressed-tensors"
    with torch.no_grad():
        assert torch.isfinite(moekit.load(str(tmp_path / "b"))(IDS[:, :8]).logits).all()


@pytest.mark.parametrize(("model", "steps", "message"), [
    ("moekit/tiny-qwen3_moe", [{"type": "decompose", "keep_params": 1.5}], "keep_params=1.5 is outside \\(0, 1\\)"),
    ("moekit/tiny-qwen3_moe", [{"type": "decompose", "keep_params": 0}], "keep_params=0.0 is outside"),
    ("moekit/tiny-qwen3_moe", [{"type": "decompose", "keep_params": 0.5, "rank": 4}], "exactly one of keep_params"),
    ("moekit/tiny-qwen3_moe", [{"type": "decompose"}], "exactly one of keep_params"),
    ("moekit/tiny-qwen3_moe", [{"type": "decompose", "rank": 17}], "rank=17 is above .* from 1 to 16"),
    ("moekit/tiny-qwen3_moe", [{"type": "decompose", "rank": 4, "budget": "global"}], "budget: global shares "
                                                                                     "keep_params"),
    ("moekit/tiny-qwen3_moe", [{"type": "decompose", "keep_params": 0.1, "method": "shared_basis"}],
     "shared_basis stores one full base"),
    ("moekit/tiny-gpt_oss", [{"type": "decompose", "keep_params": 0.5}], "gpt_oss is not supported: its experts carry "
                                                                          "biases"),
    ("moekit/tiny-llama4", [{"type": "decompose", "keep_params": 0.5}], "llama4 is not supported"),
    ("moekit/tiny-qwen3_moe", [{"type": "decompose", "keep_params": 0.5}, {"type": "prune", "remove": 0.5}],
     "prune cannot follow decompose.*materialize: true"),
])
def test_bad_input_is_refused_before_any_weight_is_read(model, steps, message, tmp_path, monkeypatch):
    import moekit.io.load

    def never(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(moekit.io.load, "open_model", never)
    with pytest.raises(MoekitError, match=message):
        moekit.compress(model, {"steps": steps}, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_interrupted_run_resumes_to_the_same_output(sources, tmp_path):
    """Stopped after its first decoder layer, the run resumed with resume=True writes the
    uninterrupted run's bytes (the finished layers' factored structure is replayed)."""
    steps = ({"type": "prune", "method": "reap", "remove": 0.5}, {"type": "decompose", "keep_params": 0.5})

    def stop(event, index):
        if event == "layer" and index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _compress(sources, "mixtral", tmp_path / "resumed", *steps, on_event=stop)
    _compress(sources, "mixtral", tmp_path / "resumed", *steps, resume=True)
    _compress(sources, "mixtral", tmp_path / "whole", *steps)
    for name in ("moekit-model.safetensors", "config.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
