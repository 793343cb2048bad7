"""What every step that leaves fewer experts per layer shares: how many it keeps
(``keep`` experts, or ``remove`` a fraction), the checks of that count against the
model, and the optional output compensation (``refit``) afterwards."""

from __future__ import annotations

from pydantic import Field, model_validator

from moekit.errors import MoekitError
from moekit.recipe.step import ModelInfo, Step
from moekit.recipe.steps import refit


class ExpertReduction(Step):
    """Base of ``prune`` and ``merge``; not a step by itself (it is not registered)."""

    keep: int | None = Field(default=None, ge=1, description="experts kept per layer")
    remove: float | None = Field(default=None, gt=0, lt=1, description="fraction of experts removed")
    refit: bool = False
    refit_ridge: float = Field(default=0.1, ge=0, description="relative ridge pulling refitted weights to the old")
    refit_samples: int = Field(default=8192, ge=16, description="calibration inputs per layer for refit")

    @model_validator(mode="after")
    def _one_budget(self) -> ExpertReduction:
        if (self.keep is None) == (self.remove is None):
            raise ValueError("give exactly one of 'keep' (experts per layer) or 'remove' (a fraction in (0, 1))")
        return self

    def kept_per_layer(self, num_experts: int) -> int:
        return self.keep if self.keep is not None else num_experts - round(self.remove * num_experts)

    def refit_needs(self) -> set[str]:
        return set(refit.NEEDS) if self.refit else set()

    def check(self, info: ModelInfo) -> None:
        keep = self.kept_per_layer(info.num_experts)
        if keep > info.num_experts:
            raise MoekitError(f"{self.name}: keep={keep} but the model has only {info.num_experts} experts per layer.")
        if keep == info.num_experts:
            raise MoekitError(f"{self.name}: keeping {keep} of {info.num_experts} experts removes nothing; lower keep.")
        if keep < info.top_k:
            raise MoekitError(
                f"{self.name}: keeping {keep} experts, fewer than top-k = {info.top_k}; keep at least {info.top_k}."
            )
        if info.n_group > 1 and keep % info.n_group:
            raise MoekitError(
                f"{self.name}: the model routes within {info.n_group} expert groups; keep a multiple of "
                f"{info.n_group} (got {keep})."
            )
        if problem := info.routing.kept_count_problem(keep // info.n_group):
            raise MoekitError(f"{self.name}: {problem}.")
