"""Weighted averages of expert tensors and of router rows."""

from __future__ import annotations

import torch


def weighted_mean(tensors: list[torch.Tensor | None], weights: torch.Tensor) -> torch.Tensor | None:
    """Σ wᵢ Tᵢ / Σ wᵢ (a plain mean when the weights sum to zero)."""
    if tensors[0] is None:
        return None
    w = weights.double()
    w = torch.full_like(w, 1.0 / len(tensors)) if w.sum() <= 0 else w / w.sum()
    stacked = torch.stack([t.double() for t in tensors])
    return (w.view(-1, *[1] * (stacked.ndim - 1)) * stacked).sum(0).to(tensors[0].dtype)


def fitted_router_row(hidden: torch.Tensor, member_logits: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, float]:
    """Least-squares router row r (and bias b) so that x·r + b tracks log Σ_{j∈group}
    exp(l_j(x)) over calibration inputs ``hidden`` [n, H]: under softmax scoring the merged
    expert then receives about the probability its members received together.

    Args:
        member_logits: [n, |group|] the members' logits.
    """
    target = torch.logsumexp(member_logits.double(), dim=1)
    design = hidden.double()
    if with_bias:
        design = torch.cat([design, torch.ones(design.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, target.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    if with_bias:
        return solution[:-1], float(solution[-1])
    return solution, 0.0
