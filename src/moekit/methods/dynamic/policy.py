"""Dynamic routing policies: per token, drop some of the experts the router chose.

Each policy looks only at a token's chosen weights w [k] (the family's final top-k
weights; ranks break ties by slot order, stably) and keeps a subset of them:

- ``skip`` (NAEE's dynamic skipping, Lu et al. 2024, generalised to any k): keep expert j
  when w_j ≥ β · max(w). β = 0 keeps all, β = 1 keeps only the top weight (and its ties).
- ``threshold`` (top-p): with q = w / Σw sorted in decreasing order, keep the shortest
  prefix whose mass reaches p (an expert is kept while the mass before it is below p),
  then at least ``min_k`` and at most ``max_k`` experts.
- ``kmin_threshold``: always the ``kmin`` largest, plus any other with w_j ≥ t · max(w).

Each policy has one free parameter (β, p or t; one value for every layer or one per
decoder layer) that `moekit.methods.dynamic.calibrate` sets from data to hit a target
number of experts per token. The kept count moves monotonically with it, which is what
makes calibration a bisection.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, TypeAdapter, field_validator

Value = float | dict[int, float]


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    free: ClassVar[str]  # the parameter calibration sets
    more_when_higher: ClassVar[bool]  # does a higher free parameter keep more experts?
    lowest: ClassVar[float] = 0.0  # the free parameter's smallest valid value

    def value_at(self, layer: int) -> float:
        """The free parameter's value in decoder layer ``layer``."""
        value = getattr(self, self.free)
        if isinstance(value, dict):
            if layer not in value:
                raise KeyError(f"the {self.kind} policy has no {self.free} for layer {layer}")
            return value[layer]
        return value

    def with_value(self, value: Value) -> _Policy:
        """The same policy with the free parameter set to ``value`` (validated)."""
        return type(self).model_validate({**self.model_dump(), self.free: value})

    def keep(self, weights: torch.Tensor, layer: int) -> torch.Tensor:
        """[T, k] bool: the slots of ``weights`` [T, k] this policy keeps in ``layer``."""
        return self.keep_with(weights, self.value_at(layer))

    def keep_with(self, weights: torch.Tensor, value: float) -> torch.Tensor:
        raise NotImplementedError

    def minimum_kept(self) -> int:
        """Experts a token keeps whatever the free parameter (the floor of any target)."""
        return 1


def _in_unit(name: str, value: Value, *, open_low: bool = False) -> Value:
    for v in value.values() if isinstance(value, dict) else [value]:
        if not (0 < v <= 1 if open_low else 0 <= v <= 1):
            raise ValueError(f"{name} must be in {'(0, 1]' if open_low else '[0, 1]'}, got {v}")
    return value


class SkipPolicy(_Policy):
    kind: Literal["skip"] = "skip"
    beta: Value = Field(description="keep expert j when w_j ≥ β·max(w); in [0, 1]")
    free: ClassVar[str] = "beta"
    more_when_higher: ClassVar[bool] = False

    @field_validator("beta")
    @classmethod
    def _unit(cls, value: Value) -> Value:
        return _in_unit("beta", value)

    def keep_with(self, weights: torch.Tensor, value: float) -> torch.Tensor:
        return _at_least_share_of_top(weights, value)


class ThresholdPolicy(_Policy):
    kind: Literal["threshold"] = "threshold"
    p: Value = Field(description="mass of the normalised weights to reach; in (0, 1]")
    min_k: int = Field(default=1, ge=1)
    max_k: int | None = Field(default=None, ge=1)
    free: ClassVar[str] = "p"
    more_when_higher: ClassVar[bool] = True
    lowest: ClassVar[float] = 1e-6  # p = 0 is no threshold; just above it keeps min_k

    @field_validator("p")
    @classmethod
    def _unit(cls, value: Value) -> Value:
        return _in_unit("p", value, open_low=True)

    def keep_with(self, weights: torch.Tensor, value: float) -> torch.Tensor:
        k = weights.shape[-1]
        order = weights.argsort(dim=-1, descending=True, stable=True)
        ranked = weights.gather(-1, order)
        mass = torch.nan_to_num(ranked / ranked.sum(dim=-1, keepdim=True))
        before = mass.cumsum(dim=-1) - mass
        count = (before < value).sum(dim=-1, keepdim=True)
        count = count.clamp(min=min(self.min_k, k), max=min(self.max_k or k, k))
        return _ranks(order) < count

    def minimum_kept(self) -> int:
        return self.min_k


class KminThresholdPolicy(_Policy):
    kind: Literal["kmin_threshold"] = "kmin_threshold"
    kmin: int = Field(default=1, ge=1)
    t: Value = Field(description="also keep expert j when w_j ≥ t·max(w); in [0, 1]")
    free: ClassVar[str] = "t"
    more_when_higher: ClassVar[bool] = False

    @field_validator("t")
    @classmethod
    def _unit(cls, value: Value) -> Value:
        return _in_unit("t", value)

    def keep_with(self, weights: torch.Tensor, value: float) -> torch.Tensor:
        order = weights.argsort(dim=-1, descending=True, stable=True)
        return (_ranks(order) < self.kmin) | _at_least_share_of_top(weights, value)

    def minimum_kept(self) -> int:
        return self.kmin


RoutingPolicy = Annotated[SkipPolicy | ThresholdPolicy | KminThresholdPolicy, Discriminator("kind")]
POLICY_KINDS = ("skip", "threshold", "kmin_threshold")
_ADAPTER = TypeAdapter(RoutingPolicy)


def policy_from_dict(data: dict) -> _Policy:
    """A policy from its mapping (``kind`` plus its fields), validated; per-layer keys may be
    strings, as JSON writes them."""
    return _ADAPTER.validate_python(data)


def _at_least_share_of_top(weights: torch.Tensor, share: float) -> torch.Tensor:
    """[T, k] bool: w_j ≥ share · max(w) (ties with the top always kept)."""
    return weights >= share * weights.max(dim=-1, keepdim=True).values


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """Rank [T, k] of every slot, from the slots in decreasing order [T, k]."""
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def apply_keep(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, keep: torch.Tensor, *, num_experts: int,
               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index, top_k_weights) [T, k] with the dropped slots pointing at expert
    ``num_experts`` (transformers' "no expert" sentinel: its experts forward skips them)
    and weight 0. ``renormalize``: the family divides the chosen weights by their sum, so
    the kept ones are rescaled to the sum the chosen ones had, as if only they were chosen."""
    weights = torch.where(keep, top_k_weights, torch.zeros_like(top_k_weights))
    if renormalize:
        before = top_k_weights.sum(dim=-1, keepdim=True)
        weights = weights * (before / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny))
    return torch.where(keep, top_k_index, torch.full_like(top_k_index, num_experts)), weights
