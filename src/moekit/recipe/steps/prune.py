"""The ``prune`` step: remove the experts each layer can best do without."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from moekit.arch.discover import moe_layers
from moekit.arch.edit import keep_experts
from moekit.errors import MoekitError
from moekit.methods.prune.criteria import CRITERIA, score
from moekit.methods.prune.reconstruction import ReconstructionObjective, count_candidates, most_evaluations, search
from moekit.methods.prune.select import global_allocation, super_experts, top_experts
from moekit.progress import counting_status
from moekit.recipe.step import ModelInfo, register_step
from moekit.recipe.steps import refit
from moekit.recipe.steps.reduce import ExpertReduction

# An explicit exhaustive search beyond this many kept sets per layer is refused up front:
# it is combinatorial (32 experts, keep 16: 6e8 sets), so a typo would run for days.
MAX_EXHAUSTIVE = 1_000_000

Method = Literal["random", "frequency", "soft_frequency", "ean", "man", "msan", "reap", "reconstruction"]


@register_step
class Prune(ExpertReduction):
    """Keep ``keep`` experts per layer (or remove the fraction ``remove``).

    ``method`` scores experts with a criterion, or (``reconstruction``) searches for the
    kept set whose layer output best matches the original on calibration inputs,
    starting from the best experts by ``seed_criterion``. ``budget: global`` lets layers
    keep different numbers (same total), saved in moekit's non-uniform format.
    ``refit`` then re-fits the kept experts' down projections so the pruned layer
    reproduces the original one on calibration inputs (`moekit.methods.refit`).
    """

    name = "prune"
    type: Literal["prune"] = "prune"
    method: Method = "reap"
    budget: Literal["uniform", "global"] = "uniform"
    protect_super_experts: bool = False
    super_expert_factor: float = Field(default=10.0, gt=1)
    seed: int = 0
    # reconstruction search
    search: Literal["auto", "exhaustive", "beam", "greedy"] = "auto"
    beam_width: int = Field(default=4, ge=1)
    seed_criterion: Literal["none", "frequency", "soft_frequency", "ean", "man", "msan", "reap"] = "reap"
    samples: int = Field(default=1024, ge=16, description="calibration inputs per layer for reconstruction")

    def needs(self) -> set[str]:
        wanted: set[str] = set()
        if self.method == "reconstruction":
            wanted |= {"hidden_sample"} | (set(CRITERIA[self.seed_criterion][1]) if self.seed_criterion != "none" else set())
        else:
            wanted |= set(CRITERIA[self.method][1])
        if self.protect_super_experts:
            wanted.add("peak")
        return wanted | self.refit_needs()

    def hidden_sample(self) -> int:
        return max(self.samples if self.method == "reconstruction" else 0, self.refit_samples if self.refit else 0)

    @property
    def counts_known_in_advance(self) -> bool:
        return self.budget == "uniform"

    def check(self, info: ModelInfo) -> None:
        super().check(info)
        if self.method == "reconstruction" and self.search == "exhaustive":
            count = count_candidates(info.num_experts, self.kept_per_layer(info.num_experts), info.n_group)
            if count > MAX_EXHAUSTIVE:
                raise MoekitError(
                    f"prune: an exhaustive search would score {count:,} candidate sets per layer (the limit is "
                    f"{MAX_EXHAUSTIVE:,}); use search: beam, or auto (exhaustive only where it is small)."
                )

    def plan_needs(self) -> set[str]:
        """A global budget splits the kept total between layers by their scores."""
        if self.budget != "global":
            return set()
        method = self.seed_criterion if self.method == "reconstruction" else self.method
        return set(CRITERIA["frequency" if method == "none" else method][1]) | {"frequency"}

    def plan(self, model: nn.Module, stats) -> dict[int, int]:
        """{layer: experts kept} for ``budget: global`` (same total as uniform)."""
        layers = {layer.index: layer for layer in moe_layers(model)}
        return global_allocation(
            {i: self._scores(layer, stats) for i, layer in layers.items()},
            sum(self.kept_per_layer(layer.num_experts) for layer in layers.values()),
            minimum={i: layer.router.spec.least_kept() for i, layer in layers.items()},
            n_group={i: layer.router.spec.n_group for i, layer in layers.items()},
        )

    def apply_layer(self, model: nn.Module, layer, stats, *, plan=None, on_progress=None) -> dict:
        stats.require(self.needs(), f"prune (method={self.method})")
        i = layer.index
        count = plan[i] if plan is not None else self.kept_per_layer(layer.num_experts)
        protected = super_experts(stats[i]["peak"], factor=self.super_expert_factor) if self.protect_super_experts \
            else set()
        n_group = layer.router.spec.n_group
        if len(protected) > count:
            raise MoekitError(
                f"prune: layer {i} has {len(protected)} super experts {sorted(protected)}, more than the {count} "
                f"kept; keep more experts or raise super_expert_factor."
            )
        result = {}
        if self.method == "reconstruction":
            start = None
            if self.seed_criterion != "none":
                start = top_experts(score(self.seed_criterion, stats[i]), min(layer.num_experts, 2 * count),
                                    n_group=n_group, protected=protected)
            objective = ReconstructionObjective(layer, stats.hidden_inputs(i, self.samples))
            bound = most_evaluations(layer.num_experts, count, method=self.search, n_group=n_group,
                                     beam_width=self.beam_width,
                                     start_size=len(set(start) | protected) if start is not None else None)
            found = search(objective, count, method=self.search, n_group=n_group, beam_width=self.beam_width,
                           start=start, fixed=frozenset(protected),
                           on_progress=counting_status(on_progress, f"layer {i}: search", "set", bound=bound))
            kept = found.kept
            result["search"] = {"search": found.method, "loss": found.loss, "evaluations": found.evaluations}
        else:
            kept = top_experts(self._scores(layer, stats), count, n_group=n_group, protected=protected)
        goal = refit.target(layer, stats, self.refit_samples) if self.refit else None
        keep_experts(model, {i: kept})
        result = {"kept": kept, **result}
        if goal is not None:
            result["refit"] = refit.refit_layer(model, layer, goal, ridge=self.refit_ridge, on_progress=on_progress)
        return result

    def _scores(self, layer, stats) -> torch.Tensor:
        method = self.seed_criterion if self.method == "reconstruction" else self.method
        if method == "none":
            method = "frequency"
        return score(method, stats[layer.index], seed=self.seed, layer=layer.index)
