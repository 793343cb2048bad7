"""Setting a routing policy's free parameter from data, to hit a number of experts per token.

The average kept count over calibration tokens is a monotone step function of the free
parameter (β, p or t, all in [0, 1]): each token's count changes at its own thresholds, so
with thousands of tokens the steps are small and bisection finds a value within a few
hundredths of an expert of the target. Where one step jumps over the target (few tokens,
or many tied weights) the closer side is returned and the achieved count says so.
"""

from __future__ import annotations

import torch

from moekit.errors import MoekitError
from moekit.methods.dynamic.policy import _Policy

ITERATIONS = 40  # halvings of [0, 1]: far below any step of a real count function


def kept_per_token(policy: _Policy, weights: list[torch.Tensor], value: float) -> float:
    """Mean experts kept per token over every row of every [N, k] tensor in ``weights``."""
    kept = sum(float(policy.keep_with(w, value).sum()) for w in weights)
    return kept / sum(w.shape[0] for w in weights)


def check_target(policy: _Policy, target: float, top_k: int) -> None:
    """Refuse a target the policy cannot reach with ``top_k`` chosen experts."""
    low = min(policy.minimum_kept(), top_k)
    high = min(getattr(policy, "max_k", None) or top_k, top_k)
    if not low <= target <= high:
        raise MoekitError(f"target of {target:g} experts per token is outside what the {policy.kind} policy can keep "
                          f"here ({low} to {high}: the router chooses {top_k}); choose a target in that range.")


def calibrate_value(policy: _Policy, weights: list[torch.Tensor], target: float) -> tuple[float, float]:
    """(value, achieved): the free parameter whose mean kept count over ``weights`` (the
    family's top-k weights [N, k] of one layer, or of every layer for one global value) is
    closest to ``target``, and that count."""
    if not weights or sum(w.shape[0] for w in weights) == 0:
        raise MoekitError("no calibration tokens reached this layer; give more calibration data.")
    check_target(policy, target, weights[0].shape[-1])
    low, high = policy.lowest, 1.0
    # orient so that moving `low` up lowers the count
    above = (lambda v: kept_per_token(policy, weights, v) < target) if policy.more_when_higher else \
        (lambda v: kept_per_token(policy, weights, v) > target)
    for _ in range(ITERATIONS):
        middle = (low + high) / 2
        if above(middle):
            low = middle
        else:
            high = middle
    candidates = [(abs(kept_per_token(policy, weights, v) - target), v) for v in (low, high)]
    value = min(candidates)[1]
    return value, kept_per_token(policy, weights, value)
