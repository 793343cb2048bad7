"""Each policy against a hand computation on small router outputs: ties, k bounds, and
renormalisation; calibration hits its target; bad parameters are refused."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moekit.errors import MoekitError
from moekit.methods.dynamic.calibrate import calibrate_value, kept_per_token
from moekit.methods.dynamic.policy import (KminThresholdPolicy, SkipPolicy, ThresholdPolicy, apply_keep,
                                           policy_from_dict)

# four tokens, top-4 weights in slot order (not sorted: the router's slot order is arbitrary)
W = torch.tensor([[0.10, 0.50, 0.25, 0.15],
                  [0.40, 0.40, 0.10, 0.10],   # a tie at the top
                  [0.25, 0.25, 0.25, 0.25],   # all tied
                  [0.70, 0.05, 0.20, 0.05]])


def test_skip_keeps_weights_at_least_beta_times_the_top():
    keep = SkipPolicy(beta=0.5).keep(W, 0)
    assert keep.tolist() == [[False, True, True, False],    # 0.25 ≥ 0.25 kept (≥, not >)
                             [True, True, False, False],
                             [True, True, True, True],
                             [True, False, False, False]]
    assert SkipPolicy(beta=0.0).keep(W, 0).all()
    assert SkipPolicy(beta=1.0).keep(W, 0).sum(-1).tolist() == [1, 2, 4, 1]  # only the top and its ties


def test_threshold_keeps_the_shortest_prefix_reaching_p_within_bounds():
    keep = ThresholdPolicy(p=0.6).keep(W, 0)
    # token 0: sorted .50 .25 → .75 ≥ .6 after two; token 1: .4 .4 (slot order breaks the tie);
    # token 2: .25 .25 .25 (.5 < .6 before the third); token 3: .7 alone
    assert keep.tolist() == [[False, True, True, False],
                             [True, True, False, False],
                             [True, True, True, False],
                             [True, False, False, False]]
    assert ThresholdPolicy(p=0.6, min_k=2).keep(W, 0).sum(-1).tolist() == [2, 2, 3, 2]
    assert ThresholdPolicy(p=0.6, max_k=2).keep(W, 0).sum(-1).tolist() == [2, 2, 2, 1]
    assert ThresholdPolicy(p=1.0).keep(W, 0).all()
    # the mass is of normalised weights: scaling a token's weights changes nothing
    assert torch.equal(ThresholdPolicy(p=0.6).keep(W * 2.5, 0), keep)


def test_kmin_threshold_keeps_the_kmin_largest_and_any_above_t_times_the_top():
    keep = KminThresholdPolicy(kmin=2, t=0.3).keep(W, 0)
    assert keep.tolist() == [[False, True, True, True],     # .15 ≥ .3·.5
                             [True, True, False, False],
                             [True, True, True, True],
                             [True, False, True, False]]  # the second largest, though .2 < .21


def test_per_layer_values():
    policy = SkipPolicy(beta={0: 0.0, 3: 1.0})
    assert policy.keep(W, 0).all() and policy.keep(W, 3).sum().item() == 8
    with pytest.raises(KeyError, match="no beta for layer 1"):
        policy.keep(W, 1)
    assert policy_from_dict({"kind": "skip", "beta": {"0": 0.0, "3": 1.0}}) == policy  # as JSON writes it


def test_dropped_slots_point_at_the_sentinel_and_renormalise_as_the_family_does():
    index = torch.tensor([[3, 1, 0, 2]])
    weights = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    keep = torch.tensor([[False, True, True, False]])
    new_index, new_weights = apply_keep(index, weights, keep, num_experts=8, renormalize=True)
    assert new_index.tolist() == [[8, 1, 0, 8]]
    torch.testing.assert_close(new_weights, torch.tensor([[0.0, 0.5 / 0.75, 0.25 / 0.75, 0.0]]))
    # a routed scaling factor survives: the kept weights sum to what the chosen ones did
    _, scaled = apply_keep(index, weights * 2.5, keep, num_experts=8, renormalize=True)
    torch.testing.assert_close(scaled.sum(), torch.tensor(2.5))
    _, plain = apply_keep(index, weights, keep, num_experts=8, renormalize=False)
    torch.testing.assert_close(plain, torch.tensor([[0.0, 0.5, 0.25, 0.0]]))


@pytest.mark.parametrize("policy", [SkipPolicy(beta=0.5), ThresholdPolicy(p=0.5), KminThresholdPolicy(t=0.5)])
@pytest.mark.parametrize("target", [1.5, 2.0, 3.2])
def test_calibration_hits_the_target_within_two_percent(policy, target):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.softmax(torch.randn(2000, 8, generator=gen) * 2, -1).topk(4).values for _ in range(2)]
    value, achieved = calibrate_value(policy, weights, target)
    assert abs(achieved - target) <= 0.02 * target
    assert achieved == kept_per_token(policy, weights, value)
    assert policy.with_value(value).keep(weights[0], 0).sum(-1).float().mean() == pytest.approx(
        kept_per_token(policy, weights[:1], value))


@pytest.mark.parametrize("policy", [SkipPolicy(beta=0.5), ThresholdPolicy(p=0.5), KminThresholdPolicy(t=0.5)])
@pytest.mark.parametrize("target", [1.0, 4.0])
def test_calibration_to_the_ends_gives_a_valid_parameter(policy, target):
    weights = [torch.softmax(torch.randn(500, 8, generator=torch.Generator().manual_seed(1)), -1).topk(4).values]
    value, achieved = calibrate_value(policy, weights, target)
    assert achieved == target
    assert policy.with_value(value).keep(weights[0], 0).sum(-1).float().mean() == target  # validates the value


@pytest.mark.parametrize(("data", "message"), [
    ({"kind": "skip", "beta": 1.5}, "beta must be in [0, 1]"),
    ({"kind": "skip", "beta": {"2": -0.1}}, "beta must be in [0, 1]"),
    ({"kind": "threshold", "p": 0.0}, "p must be in (0, 1]"),
    ({"kind": "threshold", "p": 0.5, "min_k": 0}, "min_k"),
    ({"kind": "kmin_threshold", "t": 0.5, "kmin": 0}, "kmin"),
    ({"kind": "topp", "p": 0.5}, "topp"),
])
def test_bad_parameters_are_refused(data, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("(", r"\(")):
        policy_from_dict(data)


@pytest.mark.parametrize("target", [0.5, 4.5])
def test_a_target_outside_what_the_policy_can_keep_is_refused(target):
    with pytest.raises(MoekitError, match="choose a target in that range"):
        calibrate_value(ThresholdPolicy(p=0.5), [torch.rand(10, 4)], target)
    with pytest.raises(MoekitError, match=r"\(2 to 4: the router chooses 4\)"):
        calibrate_value(KminThresholdPolicy(kmin=2, t=0.5), [torch.rand(10, 4)], 1.5)
