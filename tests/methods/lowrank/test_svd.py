"""Activation-aware SVD: exact at full rank, the optimum of the weighted error at every
rank (never worse than plain SVD there), and rank allocation equal to brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from moekit.methods.lowrank import allocate
from moekit.methods.lowrank.svd import factorize, weighted_error


def _case(out_features=12, in_features=9, tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    # correlated, unevenly scaled inputs: where whitening matters
    mix = torch.randn(in_features, in_features, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, in_features,
                                                                                                 dtype=torch.float64)
    x = torch.randn(tokens, in_features, generator=g, dtype=torch.float64) @ mix
    return weight, x.T @ x


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_full_rank_reproduces_the_weight(damp):
    weight, cov = _case()
    for factors in (factorize(weight, cov, damp=damp), factorize(weight)):
        b, a = factors.truncated(min(weight.shape))
        torch.testing.assert_close(b @ a, weight, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_activation_aware_is_never_worse_than_plain_svd_on_the_calibration_inputs(seed):
    weight, cov = _case(seed=seed)
    aware, plain = factorize(weight, cov), factorize(weight)
    for rank in range(1, min(weight.shape) + 1):
        b, a = aware.truncated(rank)
        bp, ap = plain.truncated(rank)
        error_aware, error_plain = weighted_error(weight, b @ a, cov), weighted_error(weight, bp @ ap, cov)
        assert error_aware <= error_plain * (1 + 1e-9) + 1e-9, rank
        assert error_aware == pytest.approx(aware.error(rank), rel=1e-8, abs=1e-8)  # the dropped σ² are the error
    # and it is the optimum: a random rank-r matrix near the plain one does no better
    b, a = plain.truncated(3)
    noise = torch.Generator().manual_seed(seed + 100)
    for _ in range(20):
        candidate = (b + 0.1 * torch.randn(b.shape, generator=noise, dtype=b.dtype)) @ a
        assert weighted_error(weight, candidate, cov) >= aware.error(3) * (1 - 1e-9)


def test_a_singular_input_moment_is_handled_exactly_without_damping():
    weight, _ = _case()
    x = torch.randn(4, weight.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # rank 4
    cov = x.T @ x
    factors = factorize(weight, cov)
    b, a = factors.truncated(4)
    assert weighted_error(weight, b @ a, cov) == pytest.approx(0.0, abs=1e-8)  # four ranks span the inputs


def test_allocation_by_error_keeps_the_largest_energies_as_brute_force():
    g = torch.Generator().manual_seed(0)
    energies = [torch.rand(4, generator=g, dtype=torch.float64).sort(descending=True).values for _ in range(3)]
    for units in range(0, 13):
        ranks = allocate.by_error(energies, units)
        assert sum(ranks) == units
        best = min((sum(float(e[r:].sum()) for e, r in zip(energies, choice)), choice)
                   for choice in itertools.product(range(5), repeat=3) if sum(choice) == units)
        assert sum(float(e[r:].sum()) for e, r in zip(energies, ranks)) == pytest.approx(best[0])


def test_uniform_allocation_spreads_the_units_evenly():
    energies = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([5.0, 0.5, 0.1]), torch.tensor([1.0, 0.9, 0.8])]
    assert allocate.uniform(energies, 4) == [2, 1, 1]  # one each, the spare to the largest next σ² (2.0)
    assert allocate.rank_units(100, 7, [3, 3, 3]) == 9 and allocate.rank_units(20, 7, [3, 3, 3]) == 2


def test_allocation_across_layers_minimises_the_summed_relative_error_as_brute_force():
    """Each layer's σ² count relative to its own total; the units per layer match the best
    of every rank of every expert of every layer."""
    g = torch.Generator().manual_seed(1)
    energies = {i: torch.rand(2, 3, generator=g, dtype=torch.float64).sort(descending=True).values * scale
                for i, scale in ((0, 1.0), (3, 50.0))}
    rows = [(i, e / energies[i].sum()) for i in energies for e in energies[i]]
    for units in range(0, 13):
        chosen = allocate.across_layers(energies, units)
        assert sum(chosen.values()) == units
        best = min((sum(float(e[r:].sum()) for (_, e), r in zip(rows, choice)), choice)
                   for choice in itertools.product(range(4), repeat=4) if sum(choice) == units)
        assert chosen == {0: sum(best[1][:2]), 3: sum(best[1][2:])}
