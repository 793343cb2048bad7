"""The ``decompose`` step: keep every expert, shrink inside it with low-rank factors.

    steps:
      - type: decompose
        method: svd            # or shared_basis: a base per projection + low-rank deltas (D²-MoE)
        keep_params: 0.5       # share of routed-expert parameters kept (or rank: one rank for all)
        budget: uniform        # every layer keeps that share (or global: the model's layers share it)
        allocation: error      # ranks per expert by the whitened error they remove (or uniform)
        refit: true            # re-fit the down output factors to the original layer output

Each layer is factored from its calibration sample (`moekit.methods.lowrank.layer`) and its
experts module replaced by `moekit.arch.factored.FactoredExperts`, recorded in config.json
(moekit's format, restored by `moekit.load`); ``materialize: true`` multiplies the factors
back into the family's own experts instead, for a standard checkpoint of the original size.

``budget: global`` spends the model's routed-expert parameters where they remove most error:
a planning pass factors each layer (one at a time, as the edit pass does) and keeps only
its experts' squared singular values, from which each layer's relative whitened error at
every rank is known in closed form; `moekit.methods.lowrank.allocate.across_layers` then
gives every layer its rank units of each projection type, the model-wide total being what
the uniform budget spends, and each layer splits its units between experts as before.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from moekit.errors import MoekitError
from moekit.recipe.step import ModelInfo, Step, register_step


@register_step
class Decompose(Step):
    """``method``: ``svd`` (each expert's projections factored on their own) or
    ``shared_basis`` (one base per projection and layer, each expert's delta factored).
    ``keep_params`` in (0, 1) of each layer's routed-expert parameters, or ``rank`` for every
    expert. ``whiten: false`` is plain SVD (the baseline of activation-aware SVD); ``weighting``
    and ``damp`` shape the whitening (`moekit.methods.lowrank.layer`)."""

    name = "decompose"
    type: Literal["decompose"] = "decompose"
    method: Literal["svd", "shared_basis"] = "svd"
    keep_params: float | None = Field(default=None, description="share of routed-expert parameters kept, in (0, 1)")
    rank: int | None = Field(default=None, description="one rank for every expert's projections")
    allocation: Literal["error", "uniform"] = "error"
    budget: Literal["uniform", "global"] = "uniform"
    whiten: bool = True
    weighting: Literal["tokens", "gate"] = "tokens"
    damp: float = Field(default=1.0, ge=0, description="relative damping of the input second moments")
    samples: int = Field(default=8192, ge=16, description="calibration inputs per layer")
    refit: bool = False
    refit_ridge: float = Field(default=0.1, ge=0)
    materialize: bool = False

    @model_validator(mode="after")
    def _one_budget(self) -> Decompose:
        if (self.keep_params is None) == (self.rank is None):
            raise ValueError("give exactly one of keep_params (a share of routed-expert parameters in (0, 1), e.g. "
                             "0.5) or rank (one rank for every expert)")
        if self.keep_params is not None and not 0 < self.keep_params < 1:
            raise ValueError(f"keep_params={self.keep_params} is outside (0, 1); give the share of routed-expert "
                             "parameters to keep, e.g. 0.5 for half")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank={self.rank} must be at least 1")
        if self.budget == "global" and self.keep_params is None:
            raise ValueError("budget: global shares keep_params between the layers; give keep_params instead of "
                             "rank, or drop budget: global")
        return self

    def needs(self) -> set[str]:
        return {"hidden_sample"}

    def hidden_sample(self) -> int:
        return self.samples

    def writes_native(self, model: nn.Module, plan) -> bool:
        return not self.materialize

    # -- a global budget: a planning pass measures every layer --------------------------
    def plan_needs(self) -> set[str]:
        return {"hidden_sample"} if self.budget == "global" else set()

    def plan_measure(self, layer, stats) -> dict:
        """Every expert's σ² of each projection type, [E, m] (the layer factored as the
        uniform budget would: down's whitening depends on the factored gate/up)."""
        from moekit.methods.lowrank.layer import decompose_layer

        factors = decompose_layer(layer, stats.hidden_inputs(layer.index, self.samples), self._settings())
        return {f"lowrank_{kind}": energy for kind, energy in factors.energies.items()}

    def plan(self, model: nn.Module, stats) -> dict[int, list[int]]:
        """{MoE layer: [gate/up rank units, down rank units]} spending, per projection type,
        the units the uniform budget spends in all layers together, at the least summed
        relative error. In memory (`Step.apply`), the layers are measured here."""
        from moekit.arch.discover import moe_layers
        from moekit.methods.lowrank import allocate
        from moekit.methods.lowrank.layer import projection_budget

        layers = [layer for layer in moe_layers(model) if layer.index in stats.layers]
        measured = {layer.index: stats[layer.index] if "lowrank_gate_up" in stats[layer.index]
                    else self.plan_measure(layer, stats.only(layer.index)) for layer in layers}
        chosen = []
        for kind, out_in in (("gate_up", lambda I, H: (2 * I, H)), ("down", lambda I, H: (H, I))):
            shapes = {layer.index: out_in(layer.experts.intermediate_size, layer.experts.hidden_size)
                      for layer in layers}
            if len({sum(shape) for shape in shapes.values()}) > 1:  # a rank unit must cost the same everywhere
                raise MoekitError("decompose: budget: global needs experts of the same widths in every MoE layer; "
                                  "use budget: uniform for this model.")
            total = sum(allocate.rank_units(
                projection_budget(self.keep_params, layer.num_experts, *shapes[layer.index],
                                  self.method == "shared_basis"), sum(shapes[layer.index]),
                [min(shapes[layer.index])] * layer.num_experts) for layer in layers)
            chosen.append(allocate.across_layers({i: m[f"lowrank_{kind}"] for i, m in measured.items()}, total))
        return {layer.index: [chosen[0][layer.index], chosen[1][layer.index]] for layer in layers}

    def report_plan(self, plan) -> dict:
        return {"budget": "global", "rank_units": {str(i): units for i, units in plan.items()}} if plan else {}

    def _settings(self, units=None):
        from moekit.methods.lowrank.layer import Settings

        return Settings(shared_basis=self.method == "shared_basis", keep=self.keep_params, rank=self.rank,
                        allocation=self.allocation, whiten=self.whiten, weighting=self.weighting, damp=self.damp,
                        units=tuple(units) if units is not None else None)

    # -- checks before any weight loads ---------------------------------------------------
    def check(self, info: ModelInfo) -> None:
        from moekit.arch.adapters import FAMILIES

        spec = FAMILIES[info.family].experts_spec
        if spec.transposed or spec.layout != "concatenated" or spec.clamped_swiglu or info.routing.weight_on_input:
            why = ("its experts carry biases and an interleaved, clamped SwiGLU" if spec.clamped_swiglu else
                   "it scales its experts' input by the routing weight and runs every expert on every token")
            raise MoekitError(f"decompose: {info.family} is not supported: {why}, which factored experts do not "
                              "compute. Use prune, merge or quantize for this family.")
        if self.method == "shared_basis" and self.keep_params is not None and self.keep_params * info.num_experts <= 1:
            raise MoekitError(f"decompose: shared_basis stores one full base per projection, 1/{info.num_experts} of "
                              f"the routed parameters, so keep_params={self.keep_params} leaves nothing for the "
                              f"experts; keep more than {1 / info.num_experts:.3g}, or use method: svd.")
        if self.rank is not None:
            hidden, inter = _widths(info.config)
            most = min(hidden, inter)  # down [H, I]; gate/up [2I, H] allows min(2I, H) ≥ this
            if self.rank > most:
                raise MoekitError(f"decompose: rank={self.rank} is above the experts' projections' rank (down is "
                                  f"{hidden}×{inter}: at most {most}); choose a rank from 1 to {most}, or use "
                                  "keep_params.")

    def shape_skeleton(self, skeleton: nn.Module) -> bool:
        """For `moekit.plan`: factored experts with the ranks spread evenly (allocation by
        error moves ranks between experts; every allocation spends the same rank units, so the
        parameter count is exact)."""
        if self.materialize:
            return True
        from moekit.arch.discover import moe_layers
        from moekit.arch.factored import FactoredExperts, install
        from moekit.methods.lowrank import allocate
        from moekit.methods.lowrank.layer import projection_budget

        for layer in moe_layers(skeleton):
            E, H, I = layer.num_experts, layer.experts.hidden_size, layer.experts.intermediate_size
            ranks = []
            for out_features, in_features in ((2 * I, H), (H, I)):
                limit = min(out_features, in_features)
                if self.rank is not None:
                    ranks.append([min(self.rank, limit)] * E)
                    continue
                budget = projection_budget(self.keep_params, E, out_features, in_features,
                                           self.method == "shared_basis")
                units = allocate.rank_units(budget, out_features + in_features, [limit] * E)
                ranks.append([units // E + (1 if j < units % E else 0) for j in range(E)])
            like = layer.experts.module.down_proj
            install(skeleton, layer.index, FactoredExperts(
                num_experts=E, hidden_size=H, intermediate_size=I, gate_up_ranks=ranks[0], down_ranks=ranks[1],
                base=self.method == "shared_basis", act_fn=layer.experts.activation, dtype=like.dtype,
                device=like.device))
        return True

    def plan_note(self) -> str:
        return (f"decompose: memory while a layer is factored, besides the layer: its {self.samples} calibration "
                "inputs (samples × H × 4 B), one expert's input second moments (H² + I², float64) and the layer's "
                "factors before truncation (up to twice its expert weights, float64). The parameters are exact; how "
                "the ranks are split between experts"
                + (" and layers (budget: global; the model-wide total is the uniform budget's)" if self.budget == "global"
                   else "") + " is chosen on calibration data (shown evenly)."
                + (" budget: global first runs a planning pass that factors each layer once more (as long again as "
                   "the edit) and keeps only its experts' squared singular values (E × (min(2I, H) + min(H, I)) "
                   "float64 per layer)." if self.budget == "global" else "")
                + (" materialize: the output multiplies the factors back (a standard checkpoint of the original "
                   "size)." if self.materialize else ""))

    # -- per layer --------------------------------------------------------------------------
    def apply_layer(self, model: nn.Module, layer, stats, *, plan=None, on_progress=None) -> dict:
        import torch

        from moekit.arch.edit import set_expert_weights
        from moekit.arch.factored import FactoredExperts, install
        from moekit.methods.lowrank.layer import decompose_layer
        from moekit.methods.lowrank.refit import refit_factored_down
        from moekit.methods.refit import routed_output

        stats.require(self.needs(), f"decompose (method={self.method})")
        hidden = stats.hidden_inputs(layer.index, self.samples)
        before = sum(p.numel() for p in layer.experts.module.parameters())
        goal = routed_output(layer, hidden).double() if self.refit else None
        if on_progress is not None:
            on_progress(f"layer {layer.index}: decompose")
        factors = decompose_layer(layer, hidden, self._settings(plan.get(layer.index) if plan else None))
        result = {"params_before": before, "params_after": factors.params(),
                  "relative_error": {k: round(v, 6) for k, v in factors.errors.items()},
                  "gate_up_ranks": [a.shape[0] for _, a in factors.gate_up],
                  "down_ranks": [a.shape[0] for _, a in factors.down]}
        if goal is not None:
            result["refit"] = refit_factored_down(layer, factors, hidden, goal, ridge=self.refit_ridge)
        experts = layer.experts
        if self.materialize:  # the products into the family's own tensors: a standard checkpoint
            with torch.no_grad():
                for j in range(layer.num_experts):
                    gate_up = factors.gate_up[j][0] @ factors.gate_up[j][1]
                    down = factors.down[j][0] @ factors.down[j][1]
                    if factors.gate_up_base is not None:
                        gate_up, down = gate_up + factors.gate_up_base, down + factors.down_base
                    set_expert_weights(model, layer.index, j, gate=gate_up[: experts.intermediate_size],
                                       up=gate_up[experts.intermediate_size:], down=down)
            result["params_after_materialized"] = before
            return result
        like = experts.down
        factored = FactoredExperts(
            num_experts=layer.num_experts, hidden_size=experts.hidden_size,
            intermediate_size=experts.intermediate_size, gate_up_ranks=result["gate_up_ranks"],
            down_ranks=result["down_ranks"], base=factors.gate_up_base is not None, act_fn=experts.activation,
            dtype=like.dtype, device=like.device)
        with torch.no_grad():
            for j in range(layer.num_experts):
                factored.gate_up_b[j].copy_(factors.gate_up[j][0])
                factored.gate_up_a[j].copy_(factors.gate_up[j][1])
                factored.down_b[j].copy_(factors.down[j][0])
                factored.down_a[j].copy_(factors.down[j][1])
            if factors.gate_up_base is not None:
                factored.gate_up_base.copy_(factors.gate_up_base)
                factored.down_base.copy_(factors.down_base)
        install(model, layer.index, factored)
        return result


def _widths(config) -> tuple[int, int]:
    """(hidden size, expert width) of a config's routed experts, from its meta skeleton."""
    from moekit.arch.discover import moe_layers
    from moekit.arch.edit import skeleton

    layer = moe_layers(skeleton(config))[0]
    return layer.experts.hidden_size, layer.experts.intermediate_size


def materialized(recipe):
    """``recipe`` (a `moekit.Recipe`) with every ``decompose`` step multiplying its factors back
    (``materialize: true``): what ``moekit compress --materialize`` runs.

    Raises:
        MoekitError: the recipe has no decompose step (there is nothing to materialize).
    """
    if not any(step.type == "decompose" for step in recipe.steps):
        raise MoekitError("--materialize applies to decompose steps, and this recipe has none; drop --materialize.")
    changed = type(recipe)(steps=[step.model_copy(update={"materialize": True}) if step.type == "decompose" else step
                                  for step in recipe.steps])
    changed._source = recipe._source  # errors still name the file
    return changed
