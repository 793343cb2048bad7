"""The ``quantize`` step: integer weights for every Linear of the decoder and every routed
expert, saved as a compressed-tensors ``pack-quantized`` checkpoint (`moekit.io.compressed`).

GPTQ (Frantar et al. 2022, arXiv 2210.17323) runs inside the layer-streamed loop: a
decoder layer's sub-modules are quantized in call order, each from the calibration
inputs that went through the already quantized ones (`moekit.methods.quantize.sequential`),
and the next layer reads what the quantized layer outputs. Routed experts get a Hessian
each, from their routed tokens, gate-weighted tokens (MoEQuant, arXiv 2505.03804) or all
tokens, falling back to all tokens when too few were routed, so no expert is left
unquantized or quantized blind. Routers, norms, biases, embeddings and the head keep the
source dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from moekit.errors import MoekitError
from moekit.methods.quantize.scheme import QuantScheme, fitted_group_size
from moekit.recipe.step import ModelInfo, Step, register_step

Target = Literal["linear", "experts"]


@register_step
class Quantize(Step):
    """Quantize weights to ``bits`` (routed experts to ``expert_bits`` when set) with
    ``method`` (``rtn`` round to nearest, ``gptq``), ``group_size`` input columns per scale
    (``null``: one scale per output channel), symmetric or not. ``targets`` chooses what:
    ``linear`` (attention, dense MLPs, shared experts) and ``experts`` (routed experts)."""

    name = "quantize"
    type: Literal["quantize"] = "quantize"
    method: Literal["rtn", "gptq"] = "gptq"
    bits: int = 4
    expert_bits: int | None = None
    group_size: int | None = 128
    fit_group_size: bool = Field(default=False, description="use the largest of group_size, group_size/2, ... "
                                 "(at least 16) that divides every quantized width; else one scale per channel")
    symmetric: bool = True
    targets: list[Target] = Field(default_factory=lambda: ["linear", "experts"], min_length=1)
    act_order: bool = False
    damp: float = Field(default=0.01, ge=0)
    block_size: int = Field(default=128, ge=1)
    expert_calibration: Literal["routed", "all", "gate_weighted"] = "routed"
    min_tokens: int = Field(default=16, ge=0, description="routed tokens below which an expert's Hessian uses all tokens")
    average_bits: float | None = Field(default=None, description="mixed precision: each routed expert's bits chosen "
                                       "from bit_options, at most this average over the model's experts")
    bit_options: list[Literal[2, 3, 4, 8]] = Field(default_factory=lambda: [2, 3, 4, 8], min_length=2)
    router_repair: bool = Field(default=False, description="re-fit each router to the original model's logits "
                                "on the quantized inputs (reports top-k agreement before and after)")
    router_ridge: float = Field(default=1e-2, ge=0)

    @property
    def reads_inputs(self) -> bool:
        return True  # every decoder layer, dense ones too; round to nearest just never runs it

    @property
    def reads_reference(self) -> bool:
        return self.router_repair

    @property
    def changes_structure(self) -> bool:
        return True  # not the shapes, but every later measurement: a later step recalibrates

    def scheme(self, group_size: int | None) -> QuantScheme:
        return QuantScheme(self.bits, group_size, self.symmetric)

    def expert_scheme(self, group_size: int | None) -> QuantScheme:
        return QuantScheme(self.expert_bits or self.bits, group_size, self.symmetric)

    def group_size_for(self, skeleton: nn.Module, what: Target) -> int | None:
        """The group size used on ``what`` (``linear`` or ``experts``) of this model:
        ``group_size``, or with ``fit_group_size`` the largest halving of it that divides
        every width of that kind (one size for all experts: transformers decompresses them
        all with one scheme)."""
        if not self.fit_group_size:
            return self.group_size
        return fitted_group_size(self.group_size, {width for _, width in _in_features(skeleton, [what])})

    # -- mixed precision (MC-MoE): the bits of every expert decided across the model -----
    def plan_needs(self) -> set[str]:
        from moekit.calib.observers import quant_error_name

        return {quant_error_name(self.group_size, fit=self.fit_group_size)} if self.average_bits is not None else set()

    def expert_costs(self, skeleton: nn.Module) -> dict[tuple[int, int], dict[int, int]]:
        """{(layer, expert): {bits: bytes}} of every routed expert packed (bf16 scales: the
        allocation does not depend on the scales' dtype, as every option has the same scales)."""
        from moekit.arch.discover import moe_layers

        group = self.group_size_for(skeleton, "experts")
        costs = {}
        for layer in moe_layers(skeleton):
            hidden, inner = layer.experts.hidden_size, layer.experts.intermediate_size
            for j in range(layer.num_experts):
                costs[layer.index, j] = {b: 2 * QuantScheme(b, group, self.symmetric).packed_bytes(inner, hidden)
                                         + QuantScheme(b, group, self.symmetric).packed_bytes(hidden, inner)
                                         for b in self.bit_options}
        return costs

    def plan(self, model: nn.Module, stats) -> dict:
        """{layer: bits of each expert}: the allocation of least total squared error added to
        the MoE blocks' outputs on the calibration tokens (absolute: a perturbation weighs
        what it adds to the residual stream, whichever layer it is in), within the byte
        budget of every expert at ``average_bits`` (`allocate_bits`: a MILP solved until
        proven within 0.01% of the optimum, or for at most 60 s); under ``"allocation"``,
        what the solver proved (`report_plan` puts it in the report)."""
        from moekit.calib.observers import QUANT_BITS, quant_error_name
        from moekit.methods.quantize.allocate import allocate_bits, budget_for_average_bits

        name = quant_error_name(self.group_size, fit=self.fit_group_size)
        costs = self.expert_costs(model)
        errors = {(i, j): {b: float(stats[i][name][j, QUANT_BITS.index(b)]) for b in self.bit_options}
                  for i, j in costs}
        allocation = allocate_bits(errors, costs, budget_for_average_bits(costs, self.average_bits))
        layers = sorted({i for i, _ in costs})
        return {**{i: [allocation.bits[i, j] for j in range(sum(1 for k, _ in costs if k == i))] for i in layers},
                "allocation": {"proven_optimal": allocation.proven_optimal, "mip_gap": allocation.mip_gap,
                               "within": 1e-4, "time_limit_s": 60.0,
                               "solve_seconds": round(allocation.solve_seconds, 3),
                               "total_bytes": allocation.total_bytes, "budget_bytes": allocation.budget_bytes}}

    def report_plan(self, plan) -> dict:
        """The bit allocation's proof, per run: ``proven_optimal`` (within ``within`` of the
        optimum) or not (the time limit stopped the solver), and ``mip_gap``, how far above
        the optimum its total error can at most be."""
        return {"allocation": plan["allocation"]} if plan and "allocation" in plan else {}

    def planned(self, skeleton: nn.Module, stored: torch.dtype) -> dict:
        """What this step makes of ``skeleton`` (shapes only), exactly as saved: the Linears
        and expert projections it quantizes, their bytes before (in ``stored``) and after
        (packed integers, scales in ``stored``), and the average bits per weight after."""
        from moekit.arch.discover import family_of, view_layer
        from moekit.methods.quantize.sequential import target_linears

        linear_group, expert_group = self.group_size_for(skeleton, "linear"), self.group_size_for(skeleton, "experts")
        size = stored.itemsize
        weights = before = after = modules = 0

        def add(scheme: QuantScheme, out_features: int, in_features: int, count: int = 1) -> None:
            nonlocal weights, before, after, modules
            weights += count * out_features * in_features
            before += count * out_features * in_features * size
            after += count * scheme.packed_bytes(out_features, in_features, scale_bytes=size)
            modules += count

        for index, decoder in enumerate(family_of(skeleton).decoder_layers(skeleton)):
            view = view_layer(skeleton, index)
            if "linear" in self.targets:
                for module in target_linears(decoder, view).values():
                    add(self.scheme(linear_group), module.out_features, module.in_features)
            if "experts" in self.targets and view is not None and self.average_bits is None:
                e, hidden, inner = view.num_experts, view.experts.hidden_size, view.experts.intermediate_size
                add(self.expert_scheme(expert_group), inner, hidden, 2 * e)  # gate, up
                add(self.expert_scheme(expert_group), hidden, inner, e)  # down
        if "experts" in self.targets and self.average_bits is not None:
            # calibration decides each expert's bits; their bytes are at most the budget
            from moekit.arch.discover import moe_layers
            from moekit.methods.quantize.allocate import budget_for_average_bits

            costs = self.expert_costs(skeleton)
            scales = (size - 2) * sum(QuantScheme(2, expert_group).groups(w) * rows
                                      for layer in moe_layers(skeleton) for rows, w in _expert_linears(layer))
            experts = sum(3 * layer.num_experts * layer.experts.hidden_size * layer.experts.intermediate_size
                          for layer in moe_layers(skeleton))
            weights += experts
            before += experts * size
            after += budget_for_average_bits(costs, self.average_bits) + scales
            modules += 3 * len(costs)
        return {"bits": self.bits, "expert_bits": self.average_bits or self.expert_bits or self.bits,
                "group_size": linear_group, "expert_group_size": expert_group, "modules": modules, "bytes_before": before, "bytes_after": after,
                "average_bits": round(8 * after / max(weights, 1), 3), "exact": self.average_bits is None}

    def check(self, info: ModelInfo) -> None:
        for bits, what in ((self.bits, "bits"), (self.expert_bits, "expert_bits")):
            if bits is not None:
                QuantScheme(bits, None).check(1, f"quantize: {what}")
        if self.average_bits is not None:
            low, high = min(self.bit_options), max(self.bit_options)
            if self.expert_bits is not None or "experts" not in self.targets:
                raise MoekitError("quantize: average_bits chooses the routed experts' bits itself; drop expert_bits "
                                  "and keep targets: experts.")
            if not low <= self.average_bits <= high:
                raise MoekitError(f"quantize: average_bits {self.average_bits} is outside bit_options {low}..{high}; "
                                  f"choose an average between them (at least 2 bits).")
        if self.router_repair and self.method != "gptq":
            raise MoekitError("quantize: router_repair re-fits routers on calibration inputs, which method rtn does "
                              "not read; use method: gptq.")
        if info.config is None:
            return
        from moekit.arch.edit import skeleton as build_skeleton

        skeleton = build_skeleton(info.config)
        if "experts" in self.targets and not _experts_saved_per_expert(skeleton):
            raise MoekitError(
                f"quantize: {info.family} checkpoints store routed experts as fused 3-D tensors, which "
                "compressed-tensors (one Linear at a time) cannot describe; quantize its other Linears with "
                "targets: [linear].")
        for what in self.targets:
            group_size = self.group_size_for(skeleton, what)
            for where, in_features in _in_features(skeleton, [what]):
                QuantScheme(self.bits, group_size).check(in_features, f"quantize: {where}")

    def apply_layer(self, model: nn.Module, layer, stats, *, plan=None, on_progress=None, inputs=None) -> dict:
        """Quantize the decoder layer ``inputs`` lends (``layer``: its MoE view, None when
        dense), running it on its calibration inputs for GPTQ."""
        if inputs is None:
            raise MoekitError("quantize works on a whole decoder layer with its calibration inputs: run it through "
                              "moekit.compress.")
        return self._quantize(model, inputs.layer, inputs.prefix, layer, run=inputs.run, on_progress=on_progress,
                              plan=plan, reference=inputs.reference_logits, world=inputs.streamer.world)

    def apply(self, model: nn.Module, stats, *, progress: bool = False) -> dict:
        """A model held in memory, round to nearest only (GPTQ reads the inputs a streamed
        pass provides)."""
        if self.method == "gptq":
            raise MoekitError("quantize with method gptq reads each layer's calibration inputs: run it through "
                              "moekit.compress (or use method: rtn).")
        from moekit.arch.discover import family_of, view_layer

        prefixes = {id(module): name + "." for name, module in model.named_modules()}
        return self.report({
            index: self._quantize(model, decoder, prefixes[id(decoder)], view_layer(model, index), run=None)
            for index, decoder in enumerate(family_of(model).decoder_layers(model))})

    def _quantize(self, model: nn.Module, decoder: nn.Module, prefix: str, view, *, run, on_progress=None,
                  plan=None, reference=None, world=None) -> dict:
        from moekit.io import compressed
        from moekit.methods.quantize.sequential import LayerQuantization, quantize_layer

        book = compressed.ledger(model)
        # the skeleton's shapes are enough
        linear_group, expert_group = self.group_size_for(model, "linear"), self.group_size_for(model, "experts")
        expert_scheme = self.expert_scheme(expert_group)
        chosen = plan.get(view.index) if plan is not None and view is not None else None

        def experts(j: int) -> QuantScheme:
            return expert_scheme if chosen is None else QuantScheme(chosen[j], expert_group, self.symmetric)

        spec = LayerQuantization(
            method=self.method, linear=self.scheme(linear_group) if "linear" in self.targets else None,
            experts=experts if "experts" in self.targets else None,
            expert_calibration=self.expert_calibration, min_tokens=self.min_tokens, damp=self.damp,
            act_order=self.act_order, block_size=self.block_size, scale_dtype=book.scale_dtype,
            router_repair=self.router_repair, router_ridge=self.router_ridge)
        result = quantize_layer(decoder, view, spec, run=run, on_progress=on_progress, reference_logits=reference,
                                world=world)
        for name, weight in result.linears.items():
            book.params[f"{prefix}{name}.weight"] = compressed.single(weight)
        report: dict = {"linears": len(result.linears), "group_size": linear_group, "expert_group_size": expert_group}
        if result.experts:
            experts_path = next(n for n, m in decoder.named_modules() if m is view.experts.module)
            book.params[f"{prefix}{experts_path}.gate_up_proj"] = compressed.stacked([g for g, _ in result.experts])
            book.params[f"{prefix}{experts_path}.down_proj"] = compressed.stacked([d for _, d in result.experts])
            report["experts"] = len(result.experts)
            if chosen is not None:
                report["bits"] = list(chosen)
            if result.agreement is not None:
                report["topk_agreement"] = [round(a, 6) for a in result.agreement]
            if result.tokens:
                report["tokens"] = result.tokens
                report["fallback"] = result.fallback
        notes = sorted({note for w in [*result.linears.values(), *(x for pair in result.experts for x in pair)]
                        for note in w.notes})
        if notes:
            report["notes"] = notes
        return report


def _experts_saved_per_expert(skeleton: nn.Module) -> bool:
    """Whether the family's checkpoints store each routed expert's projections as 2-D
    Linear weights (what transformers' reverse conversion writes), not one fused tensor."""
    from transformers.core_model_loading import revert_weight_conversion

    from moekit.arch.discover import moe_layers

    layers = moe_layers(skeleton)
    if not layers:
        return True
    module = layers[0].experts.module
    fused = {name: p for name, p in skeleton.named_parameters() if p is module.gate_up_proj or p is module.down_proj}
    return all(t.dim() == 2 for t in revert_weight_conversion(skeleton, fused).values())


def _in_features(skeleton: nn.Module, targets: list[str]) -> list[tuple[str, int]]:
    """(what, input width) of every Linear the step would quantize."""
    from moekit.arch.discover import family_of, view_layer
    from moekit.methods.quantize.sequential import target_linears

    found: dict[tuple[str, int], None] = {}
    for index, decoder in enumerate(family_of(skeleton).decoder_layers(skeleton)):
        view = view_layer(skeleton, index)
        if "linear" in targets:
            for name, module in target_linears(decoder, view).items():
                found[(name, module.in_features)] = None
        if "experts" in targets and view is not None:
            found[("experts gate/up", view.experts.hidden_size)] = None
            found[("experts down", view.experts.intermediate_size)] = None
    return list(found)


def _expert_linears(layer) -> list[tuple[int, int]]:
    """(rows, input width) of all of a layer's expert projections: gate and up [I, H], down [H, I]."""
    e, hidden, inner = layer.num_experts, layer.experts.hidden_size, layer.experts.intermediate_size
    return [(2 * e * inner, hidden), (e * hidden, inner)]
