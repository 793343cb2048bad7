"""From scores to the experts each layer keeps: uniform or global budgets, group-limited
routing, and protection of "super experts"."""

from __future__ import annotations

import torch

from moekit.errors import MoekitError


def top_experts(scores: torch.Tensor, keep: int, *, n_group: int = 1, protected: set[int] = frozenset()) -> list[int]:
    """The ``keep`` best experts by ``scores`` [E], protected ones first.

    With group-limited routing (``n_group`` > 1) every group keeps ``keep / n_group``
    experts, so each group can still supply its share of a token's top-k.
    """
    E = scores.shape[0]
    boosted = scores.double().clone()
    boosted[list(protected)] = float("inf")
    if n_group <= 1:
        return sorted(boosted.topk(keep).indices.tolist())
    if keep % n_group:
        raise MoekitError(f"group-limited routing with {n_group} groups needs a kept count divisible by {n_group}; got {keep}.")
    size = E // n_group
    kept = []
    for g in range(n_group):
        block = boosted[g * size : (g + 1) * size]
        kept += [g * size + i for i in block.topk(keep // n_group).indices.tolist()]
    return sorted(kept)


def global_allocation(
    scores: dict[int, torch.Tensor], total_keep: int, *, minimum: dict[int, int], n_group: dict[int, int]
) -> dict[int, int]:
    """How many experts each layer keeps when ``total_keep`` are kept model-wide.

    Scores are made comparable across layers by normalising each layer's to sum to 1
    (an expert's share of its layer's importance); the best ``total_keep`` shares win,
    then every layer is lifted to its ``minimum`` (top-k) and rounded to its group count,
    taking the difference from the layers with the weakest marginal experts.
    """
    shares = {i: s.double().clamp(min=0) / s.double().clamp(min=0).sum().clamp(min=1e-30) for i, s in scores.items()}
    ranked = sorted(((v, i) for i, s in shares.items() for v in s.tolist()), reverse=True)
    counts = {i: 0 for i in scores}
    for _, i in ranked[:total_keep]:
        counts[i] += 1
    step = {i: max(n_group.get(i, 1), 1) for i in scores}
    for i in counts:
        low = -(-minimum[i] // step[i]) * step[i]
        counts[i] = min(max(-(-counts[i] // step[i]) * step[i], low), scores[i].shape[0])
    excess = sum(counts.values()) - total_keep
    # Give back experts from the layers whose last kept share is smallest.
    while excess > 0:
        candidates = [
            (shares[i].sort(descending=True).values[counts[i] - 1].item(), i)
            for i in counts
            if counts[i] - step[i] >= max(minimum[i], 1)
        ]
        if not candidates:
            break
        _, i = min(candidates)
        counts[i] -= step[i]
        excess -= step[i]
    return counts


def super_experts(peak: torch.Tensor, *, factor: float = 10.0) -> set[int]:
    """Experts whose peak output magnitude is an outlier: above ``factor`` × the median
    peak of the layer ("super experts", whose removal wrecks the model)."""
    median = peak.double().median().item()
    if median <= 0:
        return set()
    return {j for j, value in enumerate(peak.tolist()) if value > factor * median}
