"""The ``routing_policy`` step: route with fewer experts per token, decided per token.

The policy (`moekit.methods.dynamic.policy`) is either given with its parameter, or
calibrated: streaming layer by layer, each layer's free parameter is set by bisection on
the routing weights of its calibration inputs, which already went through the policies of
the layers before it, so the target holds for the model as it will run. Nothing in the
weights changes; the policy is recorded in the output's config and `moekit.load` installs
it (plain transformers ignores it and routes as before).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from moekit.errors import MoekitError
from moekit.recipe.step import ModelInfo, Step, register_step

_FREE = {"skip": "beta", "threshold": "p", "kmin_threshold": "t"}


@register_step
class RoutingPolicyStep(Step):
    """``policy: skip | threshold | kmin_threshold`` with its parameter (``beta``, ``p`` or
    ``t``), or with a target instead: ``target_experts`` (mean experts per token) or
    ``target_fraction`` (of each layer's top-k), met in every layer (``scope: layer``), or
    met on average by one parameter for all layers (``scope: global``: set in a planning
    pass from every layer's routing weights on the calibration tokens, before any policy
    runs, so the count the policies reach together is measured and reported per layer)."""

    name = "routing_policy"
    type: Literal["routing_policy"] = "routing_policy"
    policy: Literal["skip", "threshold", "kmin_threshold"]
    beta: float | None = Field(default=None, ge=0, le=1)
    p: float | None = Field(default=None, gt=0, le=1)
    t: float | None = Field(default=None, ge=0, le=1)
    min_k: int = Field(default=1, ge=1, description="threshold: fewest experts kept")
    max_k: int | None = Field(default=None, ge=1, description="threshold: most experts kept")
    kmin: int = Field(default=1, ge=1, description="kmin_threshold: experts always kept")
    target_experts: float | None = Field(default=None, ge=1)
    target_fraction: float | None = Field(default=None, gt=0, le=1)
    scope: Literal["layer", "global"] = Field(default="layer", description="a target met in every layer, or one "
                                              "parameter for all layers meeting it on average")

    @model_validator(mode="after")
    def _one_setting(self) -> RoutingPolicyStep:
        free = _FREE[self.policy]
        others = [name for name in _FREE.values() if name != free and getattr(self, name) is not None]
        if others:
            raise ValueError(f"{others[0]} is not a parameter of the {self.policy} policy (it takes {free})")
        owners = {"min_k": "threshold", "max_k": "threshold", "kmin": "kmin_threshold"}
        # set away from its default: a recipe written back to YAML lists every field
        stray = [name for name, owner in owners.items()
                 if owner != self.policy and getattr(self, name) != type(self).model_fields[name].default]
        if stray:
            raise ValueError(f"{stray[0]} belongs to the {owners[stray[0]]} policy, not {self.policy}")
        given = [name for name in (free, "target_experts", "target_fraction") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {free} (the {self.policy} parameter), target_experts or "
                             f"target_fraction")
        return self

    @property
    def reads_inputs(self) -> bool:
        return self.calibrated

    @property
    def calibrated(self) -> bool:
        return getattr(self, _FREE[self.policy]) is None

    @property
    def changes_structure(self) -> bool:
        return False

    def base_policy(self, value: float = 1.0):
        from moekit.methods.dynamic.policy import policy_from_dict

        extras = {"threshold": {"min_k": self.min_k, "max_k": self.max_k}, "kmin_threshold": {"kmin": self.kmin}}
        return policy_from_dict({"kind": self.policy, _FREE[self.policy]: value, **extras.get(self.policy, {})})

    def target_for(self, top_k: int) -> float | None:
        if self.target_experts is not None:
            return self.target_experts
        return None if self.target_fraction is None else self.target_fraction * top_k

    def plan_needs(self) -> set[str]:
        return {"routing_weights"} if self.calibrated and self.scope == "global" else set()

    def plan(self, model: nn.Module, stats) -> dict[int, float]:
        """{layer: the one parameter value} whose mean kept count over every MoE layer's
        calibration tokens is the target."""
        from moekit.arch.discover import moe_layers
        from moekit.methods.dynamic.calibrate import calibrate_value

        layers = moe_layers(model)
        stats.require({"routing_weights"}, "routing_policy (scope: global)")
        target = self.target_for(sum(layer.top_k for layer in layers) / len(layers))
        value = calibrate_value(self.base_policy(), [stats[layer.index]["routing_weights"] for layer in layers],
                                target)[0]
        return dict.fromkeys((layer.index for layer in layers), value)

    def plan_note(self) -> str:
        """`moekit.plan`'s note: the sizes stay; experts per token drop at run time."""
        free = _FREE[self.policy]
        goal = (f"{self.target_experts:g} experts per token" if self.target_experts is not None else
                f"{self.target_fraction:.0%} of each layer's top-k experts per token" if self.target_fraction
                is not None else f"{free} = {getattr(self, free):g}")
        return (f"routing_policy: every expert is kept and the sizes do not change; the {self.policy} policy "
                f"({goal}) decides per token at run time, so active parameters and experts per token are shown at "
                "the full top-k (compress reports the mean the policy keeps on the calibration tokens).")

    def check(self, info: ModelInfo) -> None:
        from moekit.methods.dynamic.calibrate import check_target

        if info.routing.weight_on_input:
            raise MoekitError(f"routing_policy: {info.family} scales its experts' input by the routing weight; a "
                              "routing policy cannot drop experts there.")
        target = self.target_for(info.top_k)
        if target is not None:
            check_target(self.base_policy(), target, info.top_k)

    def apply_layer(self, model: nn.Module, layer, stats, *, plan=None, on_progress=None, inputs=None) -> dict:
        from moekit.methods.dynamic.install import set_layer_policy

        if layer is None:  # a dense decoder layer: nothing routes
            return {}
        free = _FREE[self.policy]
        if not self.calibrated:
            set_layer_policy(model, layer, self.base_policy(getattr(self, free)))
            return {free: getattr(self, free)}
        if inputs is None:
            raise MoekitError("routing_policy with a target reads each layer's calibration inputs: run it through "
                              "moekit.compress, or give the parameter itself.")
        from moekit.arch.layer import watching
        from moekit.methods.dynamic.calibrate import calibrate_value

        weights: list[torch.Tensor] = []

        def see(hidden: torch.Tensor) -> None:
            with torch.no_grad():
                flat = hidden.reshape(-1, hidden.shape[-1])
                weights.append(layer.router.route(layer.router.logits(flat))[1].float())

        inputs.run(watching(layer.block, see))
        if inputs.streamer.world is not None:  # this rank's rows: the value is calibrated on every rank's
            from moekit.distributed.collectives import gather_batches

            weights = gather_batches(weights, inputs.streamer.world, layer.top_k, "gathering routing weights")
        if plan is not None:  # scope global: the planned value; what it keeps here is measured
            from moekit.methods.dynamic.calibrate import kept_per_token

            value = plan[layer.index]
            achieved = kept_per_token(self.base_policy(), weights, value)
        else:
            value, achieved = calibrate_value(self.base_policy(), weights, self.target_for(layer.top_k))
        set_layer_policy(model, layer, self.base_policy(value))
        return {free: round(value, 6), "experts_per_token": round(achieved, 4)}

    def apply(self, model: nn.Module, stats, *, progress: bool = False) -> dict:
        if self.calibrated:
            raise MoekitError("routing_policy with a target reads each layer's calibration inputs: run it through "
                              "moekit.compress, or give the parameter itself.")
        return super().apply(model, stats, progress=progress)
