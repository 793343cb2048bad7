"""What a compress decides before its editing pass: statistics given with ``--stats``
checked against the run, the planning steps' cross-layer decisions (from planning passes),
and whether the output must be moekit's format."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.calib.stats import CalibrationStats, ModelDigest
from moekit.errors import MoekitError, setting
from moekit.progress import progress_bar
from moekit.recipe.passes import Collect, RecipePass
from moekit.recipe.phases import Phase
from moekit.recipe.recipe import Recipe


def check_given(folder, lent, input_ids: torch.Tensor, first: Phase):
    """Statistics `moekit calibrate` saved, checked against this compress before any work:
    the model's config (its routers are checked layer by layer as the pass reads them),
    the calibration rows, and every statistic the recipe's first calibration needs."""
    given = CalibrationStats.load(folder, input_ids=input_ids)
    if given.meta.get("config_fingerprint") != ModelDigest(lent.model.config).config_fingerprint():
        raise MoekitError(f"the statistics in {folder} were computed on another model "
                          f"({given.meta.get('model_name', 'unknown')}); calibrate this model, or drop "
                          f"{setting('stats')}.")
    missing = sorted(first.wanted - set(given.statistics))
    short = "hidden_sample" in first.wanted and given.meta.get("hidden_sample", 0) < first.hidden_sample
    if missing or short:
        wanted = ",".join(sorted(first.wanted - {"hidden_sample"}))
        sample = f" --hidden-sample {first.hidden_sample}" if "hidden_sample" in first.wanted else ""
        what = f"the statistics {missing}" if missing else \
            f"a hidden sample of {first.hidden_sample} (it has {given.meta.get('hidden_sample', 0)})"
        raise MoekitError(f"the recipe needs {what}, which {folder} does not hold; make them with "
                          f"moekit calibrate MODEL --statistics {wanted}{sample} (same data options), or drop "
                          f"{setting('stats')}.")
    return given


def plan_passes(work, fresh, input_ids, phases, *, batch_size, seed, budget, stats_meta, progress,
           given=None) -> dict[int, Any]:
    """The cross-layer decisions of the recipe's planning steps, from planning passes (in
    phase order, since a later phase's pass applies the earlier phases' edits), kept in the
    work folder so a resumed run takes the same ones."""
    saved = work.plans()
    if saved is not None:
        return {int(pos): {int(i) if i.isdigit() else i: n for i, n in plan.items()}  # layers, and named facts
                for pos, plan in saved.items()}
    plans: dict[int, Any] = {}
    for p, phase in enumerate(phases):
        planners = [(pos, step) for pos, step in phase.steps if step.plan_needs()]
        if not planners:
            continue
        needs = frozenset({"frequency"}.union(*(step.plan_needs() for _, step in planners)))
        lent = fresh()
        from moekit.calib.blocks import BLOCK_STATISTICS

        # the statistics are all there: no planning pass (unless a step measures the lent layers from its inputs)
        if p == 0 and given is not None and not needs & {*BLOCK_STATISTICS, "hidden_sample"}:
            for pos, step in planners:
                plans[pos] = step.plan(lent.model, given)
            continue
        runner = RecipePass(lent, input_ids, phases, plans=plans, batch_size=batch_size, seed=seed,
                            budget=budget, stats_meta=stats_meta, given=given)
        with progress_bar("planning", total=len(lent) * len(runner.streamer.batches) * (p + 1), unit="batch",
                          enabled=progress) as advance:
            collected = runner.run(sink=Collect(p, needs), advance=advance).collected
        for pos, step in planners:
            plans[pos] = step.plan(lent.model, collected)
    work.save_plans({str(pos): {str(i): n for i, n in plan.items()} for pos, plan in plans.items()})
    return plans


def needs_native_format(model: nn.Module, recipe: Recipe, plans: dict[int, Any]) -> bool:
    """Whether the output keeps different expert counts per layer (moekit's format),
    known before the pass from the steps' counts and the plans."""
    from moekit.arch.discover import moe_layers
    from moekit.arch.layout import DROPPED_MLP_KEY, TOP_K_KEY

    if any(getattr(model.config, key, None) for key in (TOP_K_KEY, DROPPED_MLP_KEY)):  # an input in moekit's format
        return True
    if any(step.writes_native(model, plans.get(position)) for position, step in enumerate(recipe.steps)):
        return True
    counts = []
    for layer in moe_layers(model):
        count = layer.num_experts
        for position, step in enumerate(recipe.steps):
            decided = position in plans and not step.counts_known_in_advance  # its plan is the counts
            count = plans[position][layer.index] if decided else step.kept_per_layer(count)
        counts.append(count)
    return len(set(counts)) > 1
