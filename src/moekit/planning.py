"""`moekit.plan`: what a recipe will make of a model — parameters, active parameters per
token, bytes as saved, experts per layer — before any weight is read.

The model is built from its config on PyTorch's ``meta`` device (shapes without storage,
so a 30B-parameter model takes no memory for its weights), each step's expert counts are
applied with the same `keep_experts` that compression uses, and the result is measured
by the same `summarize`. The numbers are therefore those `moekit.compress` reports, not an estimate
from a formula that could drift from the code; a test holds the two equal on every family.

Calibration decides per-layer counts only for ``budget: global``; the total is still
known (every expert of a model has the same size), so parameters and bytes stay exact
while per-layer counts and active parameters are shown for an even split.
"""

from __future__ import annotations

import os
from typing import Any

from moekit.arch.discover import moe_layers
from moekit.arch.edit import keep_experts
from moekit.arch.edit import skeleton as build_skeleton
from moekit.errors import MoekitError
from moekit.recipe import Recipe


def plan(
    model: str | os.PathLike | None,
    recipe: Recipe | str | os.PathLike | dict,
    *,
    dtype: str = "auto",
    dequantize: bool = False,
) -> dict[str, Any]:
    """Sizes before and after ``recipe``, from ``model``'s config alone.

    Args:
        model: checkpoint folder, hub id or shipped reference (None: the default model).
        recipe: a `Recipe`, a preset name, a YAML path, or a dict.
        dtype: the output dtype, as for `moekit.compress` (``auto``: the checkpoint's).
        dequantize: as for `moekit.compress`: a quantized input is refused without it.

    Returns:
        ``{"model", "recipe", "dtype", "before", "after", "exact_per_layer", "notes"}``;
        ``before`` and ``after`` have the keys of `moekit.compress`'s report.

    Raises:
        MoekitError: an invalid recipe, an unsupported model, a bad dtype, a quantized
            input without ``dequantize``.
    """
    from moekit.arch.summary import summary
    from moekit.recipe.recipe import checked_recipe
    from moekit.io.checkpoint import Checkpoint
    from moekit.io.load import default_model, quantized_source, resolve_folder, stored_dtype
    from moekit.io.save import output_dtype

    name = str(model) if model is not None else default_model()
    recipe, config = checked_recipe(name, recipe)
    source = stored_dtype(name)
    stored = output_dtype(dtype, source)
    notes_extra = quantized_source(name, dequantize, stored)
    skeleton = build_skeleton(config)
    folder = resolve_folder(name)  # the input's bytes as it stores them (headers only)
    before = summary(skeleton, source, Checkpoint(folder) if folder is not None else None)
    exact = True
    quantized = []
    for step in recipe.steps:
        keep_experts(skeleton, {layer.index: _spread_ids(layer.num_experts, step.kept_per_layer(layer.num_experts),
                                                         layer.router.spec.n_group)
                                for layer in moe_layers(skeleton)})
        exact = exact and step.counts_known_in_advance
        if hasattr(step, "shape_skeleton"):  # top-k, dropped sublayers or blocks, when known from the recipe
            decided = step.shape_skeleton(skeleton)
            if not decided:
                notes_extra.append(f"{step.type}: calibration data decides which layers it changes; the sizes "
                                   "after it are shown as before it.")
        if hasattr(step, "planned"):
            quantized.append(step.planned(skeleton, stored))
        if hasattr(step, "plan_note"):  # what the sizes cannot show (e.g. experts chosen per token at run time)
            notes_extra.append(step.plan_note())
    notes = [] if exact else [
        "budget: global lets calibration decide how many experts each layer keeps; parameters and bytes are "
        "exact, per-layer counts and active parameters per token are shown for an even split."]
    notes += notes_extra
    after = summary(skeleton, stored)
    if quantized:  # packed integers and scales replace the weights they quantize
        after["bytes"] += sum(q["bytes_after"] - q["bytes_before"] for q in quantized)
        after["quantization"] = quantized
    return {"model": name, "recipe": recipe.to_dict(), "dtype": str(stored).removeprefix("torch."),
            "before": before, "after": after, "exact_per_layer": exact, "notes": notes}


def _spread_ids(num_experts: int, keep: int, n_group: int) -> list[int]:
    """Some ``keep`` expert ids, the same number from each routing group (which only shapes
    matter for, but `keep_experts` insists on for group-limited routing)."""
    if keep == num_experts:
        return list(range(num_experts))
    if keep % n_group or num_experts % n_group:
        raise MoekitError(f"{keep} experts cannot be kept evenly from {n_group} routing groups of {num_experts}.")
    size, per_group = num_experts // n_group, keep // n_group
    return [g * size + j for g in range(n_group) for j in range(per_group)]
