"""Choosing the kept experts by how well the pruned layer reproduces the original.

NAEE's objective (Lu et al. 2024, arXiv 2402.14800): keep the set S, |S| = r, minimising
Σ_x ‖F(x) − F_S(x)‖² over the layer's calibration inputs, where F_S routes over S only
and renormalises as the family does (`moekit.arch.routing.route` with ``allowed``).
NAEE enumerates all C(E, r) sets, which is impossible beyond a few dozen experts; here
exact enumeration is used where it is small and a beam search over backward
eliminations, optionally started from the best experts by a criterion and followed by
improving swaps, where it is not.

Every expert's output on every sample is computed once ([E, n, H]); a candidate then
costs one routing and a gather. (For Llama-4, whose weight scales the expert input,
outputs depend on the weights and each candidate is recomputed.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moekit.arch.layer import MoELayer


class ReconstructionObjective:
    """Σ_x ‖F(x) − F_S(x)‖² of one layer on inputs ``hidden`` [n, H]."""

    def __init__(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        self.layer = layer
        self.hidden = hidden.to(layer.router.weight.dtype)
        self.E = layer.num_experts
        with torch.no_grad():
            self.logits = layer.router.logits(self.hidden).float()
            self.precomputed = not layer.router.spec.weight_on_input
            if self.precomputed:
                self.outputs = torch.stack(
                    [layer.experts.expert_forward(j, self.hidden).float() for j in range(self.E)]
                )  # [E, n, H]
            self.full = self._output(torch.ones(self.E, dtype=torch.bool))
        self._cache: dict[tuple[int, ...], float] = {}

    @property
    def evaluations(self) -> int:
        """Distinct candidate sets evaluated so far."""
        return len(self._cache)

    def _output(self, allowed: torch.Tensor) -> torch.Tensor:
        index, weights = self.layer.router.route(self.logits, allowed)
        if not self.precomputed:
            return self.layer.routed_forward(self.hidden, index, weights).float()
        tokens = torch.arange(self.hidden.shape[0]).unsqueeze(1)
        return (weights.unsqueeze(-1) * self.outputs[index, tokens]).sum(1)

    @torch.no_grad()
    def loss(self, kept: tuple[int, ...] | list[int]) -> float:
        key = tuple(sorted(kept))
        if key not in self._cache:
            allowed = torch.zeros(self.E, dtype=torch.bool)
            allowed[list(key)] = True
            self._cache[key] = float(((self.full - self._output(allowed)) ** 2).sum())
        return self._cache[key]


@dataclass
class SearchResult:
    kept: list[int]
    loss: float
    evaluations: int
    method: str


def _group_of(expert: int, E: int, n_group: int) -> int:
    return expert // (E // n_group)


def balanced_subsets(E: int, keep: int, n_group: int):
    """Every kept set with ``keep / n_group`` experts in each contiguous group."""
    size, per = E // n_group, keep // n_group
    groups = [itertools.combinations(range(g * size, (g + 1) * size), per) for g in range(n_group)]
    for parts in itertools.product(*groups):
        yield tuple(e for part in parts for e in part)


def count_candidates(E: int, keep: int, n_group: int = 1) -> int:
    return math.comb(E // n_group, keep // n_group) ** n_group


def most_evaluations(
    E: int,
    keep: int,
    *,
    method: str = "auto",
    n_group: int = 1,
    beam_width: int = 4,
    start_size: int | None = None,
    swap_rounds: int = 2,
    max_exhaustive: int = 5000,
) -> int:
    """The most candidate sets `search` with these arguments evaluates: a progress bar's
    total, known from the config alone (``start_size`` is ``len(set(start) | fixed)``).

    Exact for an exhaustive search without ``fixed`` experts; for a beam search an upper
    bound, tight for the eliminations (duplicates between beam members are counted) and
    loose for the swaps, which stop at the first improvement (on ref-fine's layers they
    evaluate 12–36% of their share).
    """
    if method == "auto":
        method = "exhaustive" if count_candidates(E, keep, n_group) <= max_exhaustive else "beam"
    if method == "exhaustive":
        return count_candidates(E, keep, n_group)
    width = 1 if method == "greedy" else beam_width
    size = start_size or E
    total, states = 0, 1
    for s in range(size, keep, -1):  # each state of size s has at most s children
        children = min(states * s, math.comb(size, s - 1))
        total += children
        states = min(width, children)
    # A balanced kept set can swap an expert only with the absent ones of its own group.
    absent = E // n_group - keep // n_group if keep % n_group == 0 and E % n_group == 0 else E - keep
    return total + states * swap_rounds * keep * absent


def search(
    objective: ReconstructionObjective,
    keep: int,
    *,
    method: str = "auto",
    n_group: int = 1,
    beam_width: int = 4,
    start: list[int] | None = None,
    swap_rounds: int = 2,
    max_exhaustive: int = 5000,
    fixed: frozenset[int] = frozenset(),
    on_progress: Callable[[int], None] | None = None,
) -> SearchResult:
    """Find the kept set of size ``keep`` with the lowest reconstruction loss.

    Args:
        method: ``exhaustive``, ``beam`` (``greedy`` = beam width 1), or ``auto``
            (exhaustive when at most ``max_exhaustive`` candidates exist).
        n_group: group-limited routing; every group keeps the same number of experts.
        start: experts the elimination starts from (e.g. the best 2·keep by a
            criterion); all experts when None.
        swap_rounds: rounds of single swaps (one kept out, one dropped in) after the beam.
        fixed: experts that must stay (e.g. protected "super experts").
        on_progress: called with the number of candidate sets newly evaluated, every
            `_Counted.EVERY` of them and at the end; the calls add up to the sets this
            search evaluated, at most `most_evaluations` of its arguments.
    """
    E = objective.E
    counted = _Counted(objective, on_progress)
    if method == "auto":
        method = "exhaustive" if count_candidates(E, keep, n_group) <= max_exhaustive else "beam"
    if method == "exhaustive":
        candidates = (c for c in balanced_subsets(E, keep, n_group) if fixed <= set(c))
        best = min(candidates, key=counted.loss)
        counted.flush()
        return SearchResult(sorted(best), objective.loss(best), objective.evaluations, "exhaustive")
    width = 1 if method == "greedy" else beam_width
    begin = sorted(set(start) | fixed) if start else list(range(E))
    # Refine every final beam member, not only the best: a runner-up is often one swap
    # from a better optimum than the leader's local one.
    finalists = [_swaps(counted, state, n_group, swap_rounds, fixed)
                 for state in _beam(counted, keep, n_group, width, begin, fixed)]
    kept = min(finalists, key=objective.loss)
    counted.flush()
    return SearchResult(sorted(kept), objective.loss(kept), objective.evaluations, f"{method}(width={width})")


class _Counted:
    """``objective`` that tells ``on_progress`` how many new sets it evaluated, in batches:
    one call per evaluation would cost more than an evaluation on small layers."""

    EVERY = 16

    def __init__(self, objective: ReconstructionObjective, on_progress: Callable[[int], None] | None) -> None:
        self.objective, self.E, self.on_progress = objective, objective.E, on_progress
        self.reported = objective.evaluations

    def loss(self, kept: tuple[int, ...] | list[int]) -> float:
        value = self.objective.loss(kept)
        if self.objective.evaluations - self.reported >= self.EVERY:
            self.flush()
        return value

    def flush(self) -> None:
        new = self.objective.evaluations - self.reported
        if new and self.on_progress is not None:
            self.on_progress(new)
        self.reported += new


def _beam(
    objective: _Counted, keep: int, n_group: int, width: int, start: list[int], fixed: frozenset[int]
) -> list[tuple[int, ...]]:
    """Backward elimination keeping the ``width`` best sets at each size; with groups,
    an expert may only leave a group that holds the most experts, so the sets stay
    balanced whenever their size is a multiple of ``n_group``."""
    E = objective.E
    beam = [tuple(start)]
    while len(beam[0]) > keep:
        candidates = set()
        for state in beam:
            counts = [sum(1 for e in state if _group_of(e, E, n_group) == g) for g in range(n_group)]
            for e in state:
                if e not in fixed and counts[_group_of(e, E, n_group)] == max(counts):
                    candidates.add(tuple(x for x in state if x != e))
        beam = sorted(candidates, key=objective.loss)[:width]
    return beam


def _swaps(
    objective: _Counted, kept: tuple[int, ...], n_group: int, rounds: int, fixed: frozenset[int]
) -> tuple[int, ...]:
    """First-improvement local search over single swaps within the same group."""
    E = objective.E
    best, best_loss = tuple(kept), objective.loss(kept)
    for _ in range(rounds):
        improved = False
        for out in [e for e in best if e not in fixed]:
            if improved:
                break
            for into in range(E):
                if into in best or _group_of(into, E, n_group) != _group_of(out, E, n_group):
                    continue
                candidate = tuple(sorted(x if x != out else into for x in best))
                loss = objective.loss(candidate)
                if loss < best_loss - 1e-12:
                    best, best_loss, improved = candidate, loss, True
                    break
        if not improved:
            break
    return best
