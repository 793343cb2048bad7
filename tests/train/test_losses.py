"""Router losses: values, and the gradient they put on real routers vs a hand computation."""

import pytest
import torch

from moekit.train import (
    RouterCapture,
    aux_free_bias_update,
    build_model,
    expert_load,
    load_balancing_loss,
    load_imbalance,
    load_model_config,
    router_probabilities,
    router_z_loss,
)

from .conftest import tiny_spec


def _captured(family):
    """Model, first layer's router, its input x [T, H] and its captured record."""
    model = build_model(load_model_config(tiny_spec(family)), seed=0)
    inputs = {}
    with RouterCapture(model) as cap:
        router = cap.layers[0].router.module
        handle = router.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0].detach()))
        model(input_ids=torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(1)))
        handle.remove()
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1]).float()
    return model, router, x, cap.records[0]


def test_balance_loss_is_one_at_balance_and_larger_when_skewed():
    index = torch.arange(8).repeat(4).view(16, 2)
    assert float(load_balancing_loss(torch.full((16, 8), 1 / 8), index)) == pytest.approx(1.0)
    skewed = torch.zeros(16, 8)
    skewed[:, 0] = 1.0
    assert float(load_balancing_loss(skewed, torch.zeros(16, 2, dtype=torch.long))) == pytest.approx(8.0)
    assert expert_load(index, 8).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_balance_loss_gradient_on_the_router_matches_hand_computation(family):
    model, router, x, rec = _captured(family)
    probs = router_probabilities(rec.logits, rec.scoring)
    load_balancing_loss(probs, rec.top_k_index).backward()
    num_tokens, num_experts = rec.logits.shape
    z = (x @ router.weight.detach().T).double()
    f = expert_load(rec.top_k_index, num_experts).double()
    if rec.scoring == "sigmoid":  # p = s / Σs with s = sigmoid(z): dp_j/dz_m = p_j (δ_jm − p_m)(1 − s_m)
        s = z.sigmoid()
        p = s / s.sum(-1, keepdim=True)
        dz = num_experts / num_tokens * p * (f - (f * p).sum(-1, keepdim=True)) * (1 - s)
    else:  # dL/dz_tm = (E/T) p_tm (f_m − Σ_j f_j p_tj)
        p = z.softmax(-1)
        dz = num_experts / num_tokens * p * (f - (f * p).sum(-1, keepdim=True))
    expected = dz.T @ x.double()
    assert torch.allclose(router.weight.grad.double(), expected, rtol=1e-4, atol=1e-7)
    assert expected.abs().max() > 1e-4  # the check is not vacuous


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_z_loss_gradient_on_the_router_matches_hand_computation(family):
    model, router, x, rec = _captured(family)
    router_z_loss(rec.logits).backward()
    z = (x @ router.weight.detach().T).double()
    lse = torch.logsumexp(z, -1, keepdim=True)
    expected = (2 / z.shape[0] * lse * z.softmax(-1)).T @ x.double()  # dL/dz = (2/T) lse softmax(z)
    assert torch.allclose(router.weight.grad.double(), expected, rtol=1e-4, atol=1e-8)
    assert expected.abs().max() > 1e-6


def test_no_other_parameter_of_the_layer_gets_router_loss_gradient():
    model, router, x, rec = _captured("qwen3_moe")
    router_z_loss(rec.logits).backward()
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.grad is None or experts.gate_up_proj.grad.abs().max() == 0


def test_bias_update_direction():
    bias = torch.zeros(4)
    aux_free_bias_update(bias, torch.tensor([10.0, 0.0, 5.0, 5.0]), gamma=0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


def test_bias_updates_move_a_deepseek_router_toward_balance():
    model = build_model(load_model_config(tiny_spec("deepseek_v3", num_layers=1)), seed=0)
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        gate.weight[:2] *= 30  # experts 0 and 1 take two thirds of the slots
    ids = torch.randint(3, 60, (8, 32), generator=torch.Generator().manual_seed(0))

    def load():
        with RouterCapture(model) as cap, torch.no_grad():
            model(input_ids=ids)
        return expert_load(cap.records[0].top_k_index, 8)

    before = load_imbalance(load())
    for _ in range(40):
        aux_free_bias_update(gate.e_score_correction_bias, load(), gamma=0.01)
    after = load_imbalance(load())
    assert before > 2.5 and after < 1.5
    bias = gate.e_score_correction_bias
    assert bias[:2].max() < 0 < bias[2:].min()  # favourites pushed down, the rest pulled up
