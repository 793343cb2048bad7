"""Output compensation: the features reproduce every family's routed output, the block
coordinate descent reaches the direct least-squares solution, a known optimum is found,
and pruned + refitted models of every family reload in plain transformers."""

from __future__ import annotations


import pytest
import torch

import moekit
from moekit.calib.calibrate import calibrate
from moekit.methods.refit import ExpertFeatures, layer_features, refit_down, routed_output
from moekit.recipe import Recipe
from moekit.zoo.tiny import tiny_model
from tests.reload import edit_save_reload

IDS = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
EVAL_IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _hidden(model, n=64, seed=0):
    return torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _assemble(features, down, constant):
    out = constant.clone()
    for j, f in enumerate(features):
        out.index_add_(0, f.tokens, f.z.double() @ down[j].double().T)
    return out


def test_features_reproduce_the_routed_output(family):
    """Σ_j z_j D_jᵀ + weighted down biases is the layer's routed output, for every family
    (GPT-OSS biases and Llama-4's weight-on-input included)."""
    model = tiny_model(family)
    for layer in moekit.moe_layers(model):
        x = _hidden(model)
        features, constant = layer_features(layer, x)
        expected = routed_output(layer, x).double()
        got = _assemble(features, layer.experts.down.detach(), constant)
        assert (got - expected).abs().max().item() <= 1e-5


def _random_problem(n=300, experts=4, inner=5, hidden=6, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    choice = torch.rand(n, experts, generator=g).argsort(dim=1)[:, :k]
    features = []
    for j in range(experts):
        tokens = torch.where((choice == j).any(dim=1))[0]
        features.append(ExpertFeatures(tokens, torch.randn(tokens.numel(), inner, generator=g, dtype=torch.float64)))
    target = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    down = torch.randn(experts, hidden, inner, generator=g, dtype=torch.float64)
    return features, target, down


def _direct_solution(features, target, down, ridge):
    """The joint ridge problem written out densely and solved in one go."""
    n, (E, _, I) = target.shape[0], down.shape
    Z = torch.zeros(n, E * I, dtype=torch.float64)
    lam = torch.zeros(E * I, dtype=torch.float64)
    for j, f in enumerate(features):
        Z[f.tokens, j * I:(j + 1) * I] = f.z
        lam[j * I:(j + 1) * I] = ridge * (f.z**2).sum(0).mean()
    prior = torch.cat([down[j].T for j in range(E)])  # [E·I, H]
    solution = torch.linalg.solve(Z.T @ Z + torch.diag(lam), Z.T @ target + lam[:, None] * prior)  # [E·I, H]
    return torch.stack([solution[j * I:(j + 1) * I].T for j in range(E)])


@pytest.mark.parametrize("ridge", [0.0, 0.1, 2.0])
def test_coordinate_descent_reaches_the_direct_solution(ridge):
    features, target, down = _random_problem()
    result = refit_down(features, target, down, ridge=ridge, max_sweeps=2000, tol=1e-15)
    expected = _direct_solution(features, target, down, ridge)
    assert (result.down - expected).abs().max().item() <= 1e-6
    assert result.error_after < result.error_before


def test_a_known_optimum_is_found():
    """Targets produced by known down projections are reproduced exactly (ridge 0)."""
    features, _, down = _random_problem(n=400, seed=3)
    truth = torch.randn_like(down)
    target = _assemble(features, truth, torch.zeros(400, down.shape[1], dtype=torch.float64))
    result = refit_down(features, target, down, ridge=0.0, max_sweeps=2000, tol=1e-16)
    assert (result.down - truth).abs().max().item() <= 1e-6
    assert result.error_after <= 1e-12


def test_an_unchanged_layer_keeps_its_weights():
    """Refitting a layer to its own output changes nothing: the current weights are optimal."""
    model = tiny_model("qwen3_moe")
    layer = moekit.moe_layers(model)[0]
    x = _hidden(model, n=200)
    features, constant = layer_features(layer, x)
    down = layer.experts.down.detach().clone()
    result = refit_down(features, routed_output(layer, x).double() - constant, down, ridge=0.1)
    assert result.error_before <= 1e-12
    assert (result.down - down).abs().max().item() <= 1e-5


def test_progress_counts_each_expert_update():
    """One call per expert per sweep run, empty experts included; the fit is the same."""
    features, target, down = _random_problem()
    features[1] = ExpertFeatures(torch.zeros(0, dtype=torch.int64), torch.zeros(0, down.shape[2], dtype=torch.float64))
    calls: list[int] = []
    result = refit_down(features, target, down, max_sweeps=50, on_progress=calls.append)
    assert 1 < result.sweeps < 50 and calls == [1] * (len(features) * result.sweeps)
    assert torch.equal(refit_down(features, target, down, max_sweeps=50).down, result.down)


def test_an_expert_without_tokens_keeps_its_weights():
    features, target, down = _random_problem()
    features[2] = ExpertFeatures(torch.zeros(0, dtype=torch.int64), torch.zeros(0, down.shape[2], dtype=torch.float64))
    result = refit_down(features, target, down)
    assert torch.equal(result.down[2], down[2])


def _step(**kw):
    return Recipe.from_dict({"steps": [{"refit": True, "refit_samples": 128, **kw}]}).steps[0]


@pytest.mark.parametrize("kind", ["prune", "merge"])
def test_refit_lowers_the_layer_error_on_calibration_inputs(kind):
    extra = {"method": "reap"} if kind == "prune" else {"grouping": "score"}
    step = _step(type=kind, keep=4, **extra)
    model = tiny_model("mixtral")
    stats = calibrate(model, IDS, statistics=step.needs(), hidden_sample=step.hidden_sample(), progress=False)
    report = step.apply(model, stats)["refit"]
    for layer in moekit.moe_layers(model):
        entry = report[str(layer.index)]
        assert entry["error_after"] < entry["error_before"]
        # the reported error is the refitted model's true error against the original output
        x = stats[layer.index]["hidden_sample"][:128]
        original = routed_output(moe_layer_of(tiny_model("mixtral"), layer.index), x)
        now = routed_output(layer, x)
        true_error = float(((original - now) ** 2).sum() / (original**2).sum())
        assert true_error == pytest.approx(entry["error_after"], rel=1e-3)


def moe_layer_of(model, index):
    return next(layer for layer in moekit.moe_layers(model) if layer.index == index)


@pytest.fixture(scope="module")
def refitted_and_reloaded(tmp_path_factory):
    step = _step(type="prune", method="reap", keep=4)

    def edit(model):
        step.apply(model, calibrate(model, IDS, statistics=step.needs(), hidden_sample=step.hidden_sample(),
                                    progress=False))

    return edit_save_reload(tmp_path_factory.mktemp("refit"), edit, EVAL_IDS)


def test_refitted_checkpoints_reload_in_plain_transformers(family, refitted_and_reloaded):
    in_memory, reloaded = refitted_and_reloaded
    assert (in_memory[family] - reloaded[family]).abs().max().item() <= 1e-6
