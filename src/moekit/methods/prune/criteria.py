"""Expert-importance criteria: pure functions from calibration statistics to scores.

Each returns a score per expert [E]; pruning keeps the highest. Notation as in
``shared/METHODS.md``: X_j the calibration tokens routed to expert j, p_j(x) its router
probability, g_j(x) the weight it receives, f_j(x) its output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Stats = dict[str, torch.Tensor]


def frequency(stats: Stats) -> torch.Tensor:
    """|X_j|: how often the expert is among a token's top-k (the common baseline)."""
    return stats["frequency"]


def soft_frequency(stats: Stats) -> torch.Tensor:
    """Σ_x p_j(x) over all tokens (SEER-MoE's heavy-hitter counting, arXiv 2404.05089)."""
    return stats["soft_frequency"]


def ean(stats: Stats) -> torch.Tensor:
    """Σ_{x∈X_j} ‖f_j(x)‖₂: expert activation norm (a baseline in REAP's comparison)."""
    return stats["ean"]


def man(stats: Stats) -> torch.Tensor:
    """mean_{x∈X_j} ‖f_j(x)‖₂ (mean activation norm)."""
    return stats["man"]


def msan(stats: Stats) -> torch.Tensor:
    """mean_{x∈X_j} ‖f_j(x)‖₂² (mean squared activation norm)."""
    return stats["msan"]


def reap(stats: Stats) -> torch.Tensor:
    """mean_{x∈X_j} g_j(x)·‖f_j(x)‖₂ — router-weighted expert activation pruning
    (REAP, Lasby et al., ICLR 2026, arXiv 2510.13999)."""
    return stats["reap"]


def random_scores(stats: Stats, *, seed: int = 0, layer: int = 0) -> torch.Tensor:
    """Seeded uniform noise: the baseline every criterion must beat."""
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.rand(stats["frequency"].shape[0], generator=generator)


CRITERIA: dict[str, tuple[Callable[..., torch.Tensor], frozenset[str]]] = {
    "random": (random_scores, frozenset({"frequency"})),  # only for the expert count
    "frequency": (frequency, frozenset({"frequency"})),
    "soft_frequency": (soft_frequency, frozenset({"soft_frequency"})),
    "ean": (ean, frozenset({"ean"})),
    "man": (man, frozenset({"man"})),
    "msan": (msan, frozenset({"msan"})),
    "reap": (reap, frozenset({"reap"})),
}


def score(method: str, stats: Stats, *, seed: int = 0, layer: int = 0) -> torch.Tensor:
    """Scores [E] of ``method`` on one layer's statistics (float64, higher = keep)."""
    fn, _ = CRITERIA[method]
    values = fn(stats, seed=seed, layer=layer) if method == "random" else fn(stats)
    return values.double()
