"""Ranks for a layer's experts under a parameter budget.

Within one projection type (all gate/up, or all down projections of a layer) a rank unit
costs the same for every expert (out + in parameters) and removes σ² of weighted error on
the calibration inputs, with each expert's σ² non-increasing. Keeping the N largest σ²
over all experts (N = what the budget pays for) therefore minimises the summed error
exactly — a concave knapsack with equal weights; ``tests/methods/lowrank`` checks it
against brute force. Since the whitening already weighs each token by its routing weight
(`moekit.methods.lowrank.expert_inputs`), an expert's σ² carry its importance: gate mass
× activation energy.
"""

from __future__ import annotations

import torch


def rank_units(budget: int, unit: int, limits: list[int]) -> int:
    """How many rank units of ``unit`` parameters ``budget`` pays for (at most Σ ``limits``)."""
    return max(0, min(budget // unit, sum(limits)))


def by_error(energies: list[torch.Tensor], units: int) -> list[int]:
    """Per expert, the rank that keeps the ``units`` largest σ² of all ``energies`` (each
    [m_j], non-increasing) — the least summed truncation error for that many units."""
    if units <= 0:
        return [0] * len(energies)
    owner = torch.cat([torch.full((len(e),), j, dtype=torch.long) for j, e in enumerate(energies)])
    values = torch.cat([e.double() for e in energies])
    # ties broken by expert then position, so the choice is deterministic and prefix-closed
    order = torch.argsort(values, descending=True, stable=True)[:units]
    counts = torch.bincount(owner[order], minlength=len(energies))
    return [int(c) for c in counts]


def uniform(energies: list[torch.Tensor], units: int) -> list[int]:
    """The same rank for every expert (the units that do not divide evenly go one each to
    the experts whose next σ² is largest)."""
    count = len(energies)
    ranks = [min(units // count, len(e)) for e in energies]
    left = units - sum(ranks)
    while left > 0:
        open_ = [j for j, e in enumerate(energies) if ranks[j] < len(e)]
        if not open_:
            break
        best = max(open_, key=lambda j: (float(energies[j][ranks[j]]), -j))
        ranks[best] += 1
        left -= 1
    return ranks


def across_layers(energies: dict[int, torch.Tensor], units: int) -> dict[int, int]:
    """Rank units per layer for one projection type with a model-wide ``units`` (``budget:
    global``): ``energies[i]`` [E_i, m] are layer i's σ² per expert, each row
    non-increasing, all layers' units the same size. Each layer's σ² are divided by its
    total, so what is minimised is the summed *relative* whitened error of the layers (the
    ``relative_error`` the step reports): the layers' inputs differ in scale (the residual
    stream grows with depth), and absolute errors would send the budget to the last
    layers. A layer's relative error as a function of its units is then the tail of its
    sorted σ² — convex — and keeping the ``units`` largest normalised σ² over all layers'
    experts (`by_error`) is an exact solution; ``tests/methods/lowrank`` checks it against
    brute force."""
    layers = sorted(energies)
    rows, owner = [], []
    for i in layers:
        total = float(energies[i].double().sum())
        scaled = energies[i].double() / total if total > 0 else energies[i].double() * 0
        rows += list(scaled)
        owner += [i] * len(scaled)
    counts = by_error(rows, units)
    out = dict.fromkeys(layers, 0)
    for i, count in zip(owner, counts):
        out[i] += count
    return out
