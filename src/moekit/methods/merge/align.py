"""Permutation alignment of intermediate neurons before averaging experts.

Two experts can compute the same function with their intermediate neurons in a
different order; averaging them unaligned mixes unrelated neurons. Each member is
permuted to match its group's centre by a Hungarian matching on neuron similarity
(Li et al. 2023, M-SMoE; Ainsworth et al. 2023, Git Re-Basin). A neuron is described by
its gate row, up row and down column together, and the same permutation is applied to
all three, so the member's own function is unchanged by it.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


def neuron_features(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[I, 3H]: gate row, up row and down column of every intermediate neuron."""
    return torch.cat([gate, up, down.T], dim=1)


def match(centre: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` [I] maximising Σ_i cos(centre_i, member_perm[i])."""
    a = torch.nn.functional.normalize(centre.double(), dim=1)
    b = torch.nn.functional.normalize(member.double(), dim=1)
    rows, cols = linear_sum_assignment((a @ b.T).numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def permute(tensors: dict[str, torch.Tensor | None], perm: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Reorder one expert's neurons: rows of gate/up (and their biases), columns of down."""
    out = {}
    for name, t in tensors.items():
        if t is None or name == "down_bias":
            out[name] = t
        elif name == "down":
            out[name] = t[:, perm]
        else:
            out[name] = t[perm]
    return out
