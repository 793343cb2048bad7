"""The ``topk`` step: route every token to fewer experts, per layer.

    steps:
      - type: topk
        k: 1                 # one k for every MoE layer: a standard config
      # or  per_layer: {0: 2, 3: 1}   (the layers not listed keep theirs)
      # or  target: 1.5               (an average k over MoE layers, chosen on calibration data)
      #     criterion: output         (or gate_mass)

With a ``target`` the step measures, on calibration tokens of each MoE layer, the cost of
every k below the layer's top-k K — ``output``: Σ‖R_K − R_k‖² / Σ‖R_K‖², the share of the
layer's routed output lost when its router picks k experts with the family's own weighting
(`moekit.arch.routing.route` with k: renormalised, softmax over the k, scaled, as the
family does); ``gate_mass``: 1 − the router probability mass of the k best choices over
the K best's — and picks the k of every layer minimising the summed cost at
Σ k = round(target × MoE layers) exactly (`moekit.methods.drop.allocate.allocate_top_k`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from moekit.arch.edit import set_top_k
from moekit.errors import MoekitError
from moekit.recipe.step import ModelInfo, Step, register_step


@register_step
class TopK(Step):
    """Fewer experts per token: one ``k``, a ``per_layer`` map, or a ``target`` average
    chosen from calibration data by ``criterion``."""

    name = "topk"
    type: Literal["topk"] = "topk"
    k: int | None = Field(default=None, description="top-k of every MoE layer")
    per_layer: dict[int, int] | None = Field(default=None, description="{decoder layer: top-k}")
    target: float | None = Field(default=None, description="average top-k over MoE layers, chosen on data")
    criterion: Literal["output", "gate_mass"] = "output"

    @model_validator(mode="after")
    def _one_choice(self) -> TopK:
        given = [name for name in ("k", "per_layer", "target") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'k' (every MoE layer), 'per_layer' ({layer: k}) or 'target' "
                             "(an average k chosen on calibration data)")
        return self

    # -- checks before any weight loads -------------------------------------------
    def check(self, info: ModelInfo) -> None:
        from moekit.arch.renumber import moe_layer_indices

        K = info.top_k
        if info.routing.scoring == "sparsemixer":
            raise MoekitError(f"topk: this model's sparsemixer router always picks {K} experts in transformers' "
                              "code; its top-k cannot change. Drop the topk step.")
        if K == 1:
            raise MoekitError("topk: the model already routes each token to 1 expert; nothing to reduce. Drop the "
                              "topk step.")
        fix = f"choose k from 1 to {K - 1}"
        if self.k is not None and not 1 <= self.k < K:
            raise MoekitError(f"topk: k={self.k} but the model routes to {K} experts per token; {fix}"
                              + (" (k = top-k changes nothing)." if self.k == K else "."))
        if self.target is not None and not 1 <= self.target < K:
            raise MoekitError(f"topk: target={self.target} is outside [1, {K}) (the model's top-k is {K}); "
                              f"give an average top-k of at least 1 and below {K}.")
        if self.per_layer is not None:
            moe = moe_layer_indices(info.config)
            unknown = sorted(set(self.per_layer) - set(moe))
            if unknown:
                raise MoekitError(f"topk: per_layer names layers {unknown}, which have no routed experts; MoE "
                                  f"layers are {moe}.")
            bad = {i: k for i, k in self.per_layer.items() if not 1 <= k <= K}
            if bad:
                raise MoekitError(f"topk: per_layer {bad} is outside 1..{K} (the model's top-k); {fix}.")

    @property
    def counts_known_in_advance(self) -> bool:
        return True

    def top_k_after(self, top_k: int) -> int:
        return self.k if self.k is not None else top_k

    def plan_needs(self) -> set[str]:
        return {"topk_error" if self.criterion == "output" else "topk_mass"} if self.target is not None else set()

    def plan(self, model: nn.Module, stats) -> dict[int, int]:
        """{MoE layer: k} meeting ``target`` on average, at the least summed cost."""
        from moekit.arch.discover import moe_layers
        from moekit.methods.drop.allocate import allocate_top_k

        layers = [layer for layer in moe_layers(model) if layer.index in stats.layers]  # not in a dropped block
        costs = {}
        for layer in layers:
            if self.criterion == "output":
                costs[layer.index] = stats[layer.index]["topk_error"].tolist()
            else:
                costs[layer.index] = (1 - stats[layer.index]["topk_mass"]).tolist()
        total = max(len(layers), min(round(self.target * len(layers)), sum(len(c) for c in costs.values())))
        return allocate_top_k(costs, total)

    def writes_native(self, model: nn.Module, plan) -> bool:
        from moekit.arch.discover import moe_layers

        if self.k is not None:
            return False
        return len({self._k(layer, plan) for layer in moe_layers(model) if plan is None or layer.index in plan}) > 1

    def report_plan(self, plan) -> dict:
        if not plan:
            return {}
        return {"target": self.target, "criterion": self.criterion,
                "average_top_k": round(sum(plan.values()) / len(plan), 4)}

    def _k(self, layer, plan) -> int:
        if self.k is not None:
            return self.k
        if self.per_layer is not None:
            return self.per_layer.get(layer.index, layer.top_k)
        return int(plan.get(layer.index, layer.top_k))

    def shape_skeleton(self, skeleton: nn.Module) -> bool:
        """For `moekit.plan`: set the k the recipe names (False: calibration decides it)."""
        from moekit.arch.discover import moe_layers

        if self.target is not None:
            return False
        set_top_k(skeleton, {layer.index: self._k(layer, None) for layer in moe_layers(skeleton)})
        return True

    def apply_layer(self, model: nn.Module, layer, stats, *, plan=None, on_progress=None) -> dict:
        before, k = layer.top_k, self._k(layer, plan)
        if k > before:
            raise MoekitError(f"topk: layer {layer.index} routes to {before} experts; k={k} would add experts. "
                              f"Choose k ≤ {before}.")
        if k != before:
            set_top_k(model, {layer.index: k})
        return {"top_k": k, "top_k_before": before}
