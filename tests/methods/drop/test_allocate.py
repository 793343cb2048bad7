"""The top-k allocation is the exact optimum; the lowest-score choice skips refused drops."""

import itertools
import random

import pytest

from moekit.methods.drop.allocate import allocate_top_k, choose_lowest


def test_allocation_is_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(150):
        costs = {2 * i: [rng.random() for _ in range(rng.randint(1, 4))] for i in range(rng.randint(1, 4))}
        layers = sorted(costs)
        total = rng.randint(len(layers), sum(len(costs[i]) for i in layers))
        got = allocate_top_k(costs, total)
        assert sum(got.values()) == total and all(1 <= got[i] <= len(costs[i]) for i in layers)
        best = min(sum(costs[i][k - 1] for i, k in zip(layers, ks))
                   for ks in itertools.product(*[range(1, len(costs[i]) + 1) for i in layers]) if sum(ks) == total)
        assert sum(costs[i][got[i] - 1] for i in layers) == pytest.approx(best, abs=1e-12)


def test_allocation_refuses_an_impossible_total():
    with pytest.raises(ValueError, match="outside"):
        allocate_top_k({0: [1.0, 0.0], 1: [1.0, 0.0]}, 5)


def test_choose_lowest_passes_over_refused_choices():
    scores = {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.05}
    assert choose_lowest(scores, 2) == [0, 3]
    assert choose_lowest(scores, 2, allowed=lambda chosen: 0 not in chosen) == [2, 3]
    assert choose_lowest(scores, 9) == [0, 1, 2, 3]
