"""Pruning criteria against hand computations; reconstruction search against enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch

import moekit
from moekit.methods.prune.criteria import score
from moekit.methods.prune.reconstruction import ReconstructionObjective, balanced_subsets, most_evaluations, search
from moekit.methods.prune.select import global_allocation, super_experts, top_experts
from moekit.zoo.tiny import tiny_model

STATS = {
    "frequency": torch.tensor([10.0, 0.0, 5.0, 7.0]),
    "soft_frequency": torch.tensor([3.0, 0.5, 2.0, 2.5]),
    "reap": torch.tensor([0.2, 0.0, 0.9, 0.1]),
    "ean": torch.tensor([4.0, 0.0, 6.0, 1.0]),
    "man": torch.tensor([0.4, 0.0, 1.2, 1 / 7]),
    "msan": torch.tensor([0.2, 0.0, 1.5, 0.05]),
}


@pytest.mark.parametrize("method, best_two", [
    ("frequency", [0, 3]), ("soft_frequency", [0, 3]), ("reap", [0, 2]), ("ean", [0, 2]),
    ("man", [0, 2]), ("msan", [0, 2]),
])
def test_criteria_pick_the_highest_statistic(method, best_two):
    assert torch.equal(score(method, STATS), STATS[method].double())
    assert top_experts(score(method, STATS), 2) == best_two


def test_random_is_seeded_and_differs_by_layer():
    a = score("random", STATS, seed=1, layer=0)
    assert torch.equal(a, score("random", STATS, seed=1, layer=0))
    assert not torch.equal(a, score("random", STATS, seed=1, layer=1))


def test_groups_keep_the_same_number_each():
    scores = torch.tensor([9.0, 8, 7, 6, 1, 2, 3, 4])
    assert top_experts(scores, 4) == [0, 1, 2, 3]
    assert top_experts(scores, 4, n_group=2) == [0, 1, 6, 7]
    assert top_experts(scores, 2, protected={4}) == [0, 4]


def test_super_experts_are_outliers():
    assert super_experts(torch.tensor([1.0, 1.2, 0.9, 50.0, 1.1])) == {3}
    assert super_experts(torch.tensor([1.0, 1.2, 0.9, 1.1])) == set()


def test_global_allocation_keeps_total_and_minimum():
    scores = {0: torch.tensor([10.0, 10, 10, 10]), 1: torch.tensor([100.0, 1, 1, 1]), 2: torch.tensor([5.0, 5, 4, 4])}
    counts = global_allocation(scores, 6, minimum={0: 1, 1: 1, 2: 1}, n_group={})
    assert sum(counts.values()) == 6 and all(c >= 1 for c in counts.values())
    assert counts[1] == 1  # one dominant expert carries layer 1
    grouped = global_allocation(scores, 6, minimum={0: 2, 1: 2, 2: 2}, n_group={0: 2, 1: 2, 2: 2})
    assert all(c % 2 == 0 and c >= 2 for c in grouped.values()) and sum(grouped.values()) == 6


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe", "llama4"])
def test_objective_is_the_true_reconstruction_error(family):
    model = tiny_model(family)
    layer = moekit.moe_layers(model)[-1]
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    objective = ReconstructionObjective(layer, x)
    kept = [0, 3, 5, 6]
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[kept] = True
    with torch.no_grad():
        full = layer.forward(x)[0]
        pruned = layer.forward(x, allowed=allowed)[0]
    expected = float(((full - pruned) ** 2).sum())
    assert objective.loss(kept) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family, keep", [("mixtral", 3), ("mixtral", 5), ("deepseek_v3", 4), ("olmoe", 4)])
def test_search_matches_enumeration(family, keep):
    model = tiny_model(family)
    layer = moekit.moe_layers(model)[0]
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    objective = ReconstructionObjective(layer, x)
    n_group = layer.router.spec.n_group
    brute = min(balanced_subsets(8, keep, n_group), key=objective.loss)
    exact = search(objective, keep, method="exhaustive", n_group=n_group)
    assert exact.kept == sorted(brute)
    beam = search(objective, keep, method="beam", n_group=n_group, beam_width=4)
    assert beam.loss == pytest.approx(exact.loss, rel=1e-6)
    if n_group > 1:
        assert all(sum(1 for e in beam.kept if e // 4 == g) == keep // 2 for g in range(2))


def test_enumeration_is_complete():
    assert len(list(balanced_subsets(8, 4, 1))) == 70
    subsets = list(balanced_subsets(8, 4, 2))
    assert len(subsets) == 36 and len(set(subsets)) == 36
    assert all(sum(e < 4 for e in s) == 2 for s in subsets)
    assert set(itertools.combinations(range(8), 4)) >= set(subsets)


def test_fixed_experts_stay():
    model = tiny_model("mixtral")
    layer = moekit.moe_layers(model)[0]
    objective = ReconstructionObjective(layer, torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))
    free = search(objective, 3, method="exhaustive")
    pinned = next(e for e in range(8) if e not in free.kept)
    for method in ("exhaustive", "beam"):
        result = search(objective, 3, method=method, fixed=frozenset({pinned}))
        assert pinned in result.kept and result.loss >= free.loss - 1e-9


@pytest.mark.parametrize("family, keep, method, start, fixed", [
    ("mixtral", 3, "exhaustive", None, ()),
    ("mixtral", 3, "exhaustive", None, (5,)),
    ("mixtral", 3, "beam", None, ()),
    ("mixtral", 2, "greedy", None, ()),
    ("mixtral", 3, "beam", [0, 1, 2, 4, 5, 6], (6,)),
    ("deepseek_v3", 4, "beam", None, ()),
    ("olmoe", 5, "auto", None, ()),
])
def test_search_reports_every_evaluation_within_its_bound(family, keep, method, start, fixed):
    """The progress calls add up to the sets evaluated, in batches of 16 (many per layer),
    never exceed `most_evaluations` (exactly it for an exhaustive search without fixed
    experts), and leave the result unchanged."""
    model = tiny_model(family)
    layer = moekit.moe_layers(model)[0]
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    n_group = layer.router.spec.n_group
    kwargs = dict(method=method, n_group=n_group, start=start, fixed=frozenset(fixed))
    calls: list[int] = []
    result = search(ReconstructionObjective(layer, x), keep, on_progress=calls.append, **kwargs)
    n = result.evaluations
    assert n > 16 and calls == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    start_size = len(set(start) | set(fixed)) if start else None
    bound = most_evaluations(8, keep, method=method, n_group=n_group, start_size=start_size)
    assert result.evaluations <= bound
    if result.method == "exhaustive" and not fixed:
        assert result.evaluations == bound
    assert search(ReconstructionObjective(layer, x), keep, **kwargs) == result
