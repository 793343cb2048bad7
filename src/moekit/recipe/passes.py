"""A recipe run as streamed passes over the model: one decoder layer at a time.

A recipe's steps fall into *phases*: a phase begins at a step that needs statistics of the
model as the steps before it left it (the first such step, and any after a structural
change). Each phase has its own stream of calibration hidden states. For decoder layer i,
in phase order, stream p runs through the layer as the phases before p left it (its
statistics accumulating), then phase p's steps edit the layer from those statistics. So
stream 0 sees the original model, stream 1 the model after phase 0, and so on — exactly
the calibrations of an in-memory run, computed in one pass with one layer in memory.

A step that decides across layers (a global budget) gets a first *planning* pass that
collects its `Step.plan_needs` for every layer (applying the earlier phases' edits, not
writing anything); its `Step.plan` is then fixed before the pass that edits and writes.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moekit.calib.activations import ActivationBudget, HiddenStates
from moekit.calib.calibrate import new_accumulator, observing
from moekit.calib.runner import watching
from moekit.calib.stats import CalibrationStats, ModelDigest
from moekit.distributed import agree_layer
from moekit.distributed.runs import layer_done
from moekit.errors import MoekitError, setting
from moekit.io.compressed import ledger
from moekit.io.layered import LayeredModel
from moekit.progress import progress_bar
from moekit.recipe.recipe import Recipe
from moekit.recipe.step import Step


@dataclass
class Phase:
    """Steps (with their positions in the recipe) that read one calibration."""

    steps: list[tuple[int, Step]]
    wanted: frozenset[str]
    hidden_sample: int

    @property
    def reads_inputs(self) -> bool:
        """Its steps run each decoder layer themselves (`Step.reads_inputs`)."""
        return any(step.reads_inputs for _, step in self.steps)

    @property
    def reads_reference(self) -> bool:
        """Its steps compare with the layers as they were before the phase (`Step.reads_reference`)."""
        return any(step.reads_reference for _, step in self.steps)


def phases_of(recipe: Recipe) -> list[Phase]:
    """Split ``recipe`` into phases. Every calibration collects what any step of the
    recipe needs (as one in-memory calibration always did)."""
    wanted = frozenset({"frequency"}.union(*(s.needs() for s in recipe.steps)))
    hidden = max((s.hidden_sample() for s in recipe.steps), default=0)
    phases: list[Phase] = []
    stale = True
    for position, step in enumerate(recipe.steps):
        # a step that runs the layer on its inputs gets a stream of its own, in which no
        # step reads statistics (they would be measured on the layer it is changing)
        after_inputs = bool(phases) and phases[-1].reads_inputs and bool(step.needs())
        # a step that decides from statistics of every layer (`plan_needs`) plans on the model as
        # the steps before it left it, so it starts a phase after a structural change too
        reads = step.needs() or step.plan_needs()
        if not phases or (reads and stale) or (step.reads_inputs and phases[-1].steps) or after_inputs:
            phases.append(Phase([], wanted, hidden))
            stale = False
        phases[-1].steps.append((position, step))
        stale = stale or step.changes_structure
    return phases


@dataclass
class PassResult:
    """What a pass produced: per step, each layer's report; per phase, the calibration's
    model fingerprint and seconds; for a planning pass, the collected statistics."""

    per_layer: dict[int, dict[int, dict]] = field(default_factory=dict)  # step position -> layer -> report
    digests: list[ModelDigest] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    collected: CalibrationStats | None = None


class RecipePass:
    """Runs ``phases`` over ``lent`` layer by layer (see the module docstring).

    Args:
        lent: the model, lending one decoder layer at a time (a fresh skeleton per pass:
            a pass changes its structure).
        input_ids: [N, S] calibration rows.
        plans: {step position: `Step.plan` result} for the steps that plan.
        stats_meta: provenance stored in every layer's statistics (the steps check
            ``statistics`` in it).
        given: statistics `moekit calibrate` saved, used for the first phase instead of
            calibrating (checked by `check_given` before the pass); each layer's router
            must match the one they were computed on.
    """

    def __init__(self, lent: LayeredModel, input_ids: torch.Tensor, phases: list[Phase], *, plans: dict[int, Any],
                 batch_size: int, seed: int, budget: ActivationBudget | None, stats_meta: dict,
                 given: CalibrationStats | None = None) -> None:
        from moekit.calib.runner import LayerStreamer

        self.lent = lent
        self.phases = phases
        self.plans = plans
        self.seed = seed
        self.budget = budget or ActivationBudget()
        self.stats_meta = stats_meta
        self.given = given
        self.streamer = LayerStreamer(lent, input_ids, batch_size=batch_size, budget=self.budget, shard=True)

    def run(self, *, writer=None, work=None, collect: tuple[int, frozenset[str]] | None = None,
            advance=lambda n=1, status=None: None, on_layer=None) -> PassResult:
        """One pass. ``writer`` (a `ShardWriter`) gets each finished layer; ``work`` (a
        `WorkFolder`) makes the pass resumable; ``collect=(phase, names)`` makes it a
        planning pass: phases up to ``phase`` run, that phase's steps do not, and its
        statistics ``names`` of every layer are returned. ``on_layer(index)`` follows each
        finished (and, with ``work``, committed) layer."""
        from moekit.arch.discover import view_layer
        from moekit.calib.blocks import BLOCK_STATISTICS

        last = len(self.phases) - 1 if collect is None else collect[0]
        dropped = self.dropped_blocks(last)
        block_wanted = frozenset(collect[1] & set(BLOCK_STATISTICS)) if collect is not None else frozenset()
        candidates: dict[tuple[str, int], HiddenStates] = {}
        result = PassResult(digests=[ModelDigest(self.lent.model.config) for _ in range(last + 1)],
                            seconds=[0.0] * (last + 1))
        collected: dict[int, dict[str, torch.Tensor]] = {}
        tokens: dict[int, int] = {}
        first = self._resume(work, result, last) if work is not None else 0
        streams, references = self._streams(last + 1, work, first)
        for index, layer in self.streamer.layers(first):
            view = None
            routers_before = [len(d.routers) for d in result.digests]
            for p in range(last + 1):
                if index in dropped and dropped[index] < p:  # an earlier phase dropped the block: stream p skips it
                    continue
                view = view_layer(self.lent.model, index)  # an earlier phase may have dropped its MoE sublayer
                start = time.perf_counter()
                status = f"layer {index + 1}/{len(self.lent)}" + (f", phase {p + 1}" if last else "")
                phase = self.phases[p]
                planning = collect is not None and p == last  # this phase's statistics are collected, not applied
                if planning and block_wanted:
                    collected[index], tokens[index] = self._measure_block(index, layer, view, streams[p], collect[1],
                                                                          block_wanted, candidates, result.digests[p],
                                                                          lambda b: advance(1, status))
                    continue
                if phase.reads_inputs and not planning:  # the steps run the layer, then the stream goes through it
                    if view is not None:
                        result.digests[p].add_router(view.router.weight)
                    reference = None
                    if p in references:  # the layer before this phase's edits, on a stream that never had them
                        reference = self._router_logits(index, layer, view, references[p])
                    self._apply_on_inputs(phase, index, layer, view, streams[p], result, advance, status, reference)
                    self.streamer.forward(index, layer, streams[p], on_batch=lambda b: advance(1, status))
                    result.seconds[p] += time.perf_counter() - start
                    continue
                if view is None:
                    self.streamer.forward(index, layer, streams[p], on_batch=lambda b: advance(1, status))
                    continue
                if p == 0 and self.given is not None:  # statistics read, not computed: stream 0 idles
                    advance(len(streams[p]), status)
                    result.digests[p].add_router(view.router.weight)
                    self._check_router(index, result.digests[p].routers[-1])
                    stats = self.given.only(index)
                    if collect is not None and p == last:
                        collected[index], tokens[index] = self._planned(phase, view, stats), stats.tokens[index]
                        continue
                    self._apply(phase, index, view, stats, result, advance)
                    continue
                wanted = collect[1] if collect is not None and p == last else phase.wanted
                sample = phase.hidden_sample if collect is None or "hidden_sample" in wanted else 0
                accumulator = new_accumulator(view, wanted, sample, self.seed, self.streamer)
                result.digests[p].add_router(view.router.weight)
                self.streamer.forward(index, layer, streams[p], observe=observing(view, accumulator),
                                      on_batch=lambda b: advance(1, status))
                stats = CalibrationStats({index: accumulator.finish()}, {index: accumulator.tokens},
                                         meta={**self.stats_meta, "statistics": sorted(wanted)})
                result.seconds[p] += time.perf_counter() - start
                if collect is not None and p == last:
                    collected[index], tokens[index] = self._planned(phase, view, stats), accumulator.tokens
                    continue
                self._apply(phase, index, view, stats, result, advance)
            if writer is not None and index not in dropped:
                writer.write_layer(index, f"{self.lent.layers_path}.{index}.",
                                   as_index=index - sum(1 for i in dropped if i < index))
            elif writer is not None:
                ledger(self.lent.model).discard(f"{self.lent.layers_path}.{index}.")
            else:  # a planning pass writes nothing: what a step left for the writer goes
                ledger(self.lent.model).discard(f"{self.lent.layers_path}.{index}.")
            if work is not None:  # the layer as the steps left it (a step may have changed its top-k or sublayer)
                layer_done(self.streamer.world, index)  # ranks commit a layer only once all have computed it
                view = view_layer(self.lent.model, index)
                self._commit(work, index, view, [*streams, *references.values()], result, routers_before)
            if on_layer is not None:
                on_layer(index)
        if candidates:  # each candidate stream skipped one layer (sublayer): its loss against the model's
            from moekit.calib.blocks import mean_loss

            base = mean_loss(self.streamer, streams[last])
            for (name, index), stream in candidates.items():
                collected[index][name] = torch.tensor([mean_loss(self.streamer, stream) - base])
        if collect is not None:
            result.collected = CalibrationStats(collected, tokens, meta={"statistics": sorted(collect[1])})
        return result

    def dropped_blocks(self, last: int | None = None) -> dict[int, int]:
        """{decoder layer: the phase whose step drops it} for the phases up to ``last``."""
        out: dict[int, int] = {}
        for q, phase in enumerate(self.phases[: None if last is None else last + 1]):
            for position, step in phase.steps:
                for index in step.blocks_dropped(self.plans.get(position)):
                    out.setdefault(int(index), q)
        return out

    @staticmethod
    def _planned(phase: Phase, view, stats: CalibrationStats) -> dict[str, torch.Tensor]:
        """A planning pass's statistics of layer ``view.index``, or what the phase's planning
        steps measure from them on the lent layer (`Step.plan_measure`) in their place."""
        entry, measured = dict(stats[view.index]), {}
        for _, step in phase.steps:
            if step.plan_needs():
                measured |= step.plan_measure(view, stats)
        if measured:  # what it was measured from is too big to keep for every layer
            entry.pop("hidden_sample", None)
        return entry | measured

    def _measure_block(self, index: int, layer: nn.Module, view, stream: HiddenStates, wanted: frozenset[str],
                       block_wanted: frozenset[str], candidates: dict, digest: ModelDigest,
                       on_batch) -> tuple[dict[str, torch.Tensor], int]:
        """A planning pass's statistics of decoder layer ``index``, dense or MoE: its MoE
        statistics (when it has experts) and the layer's `moekit.calib.blocks` ones;
        ``candidates`` are the streams that each skip one earlier layer (loss criteria):
        they go through this layer, and this layer's own start here."""
        from moekit.calib.blocks import forward_measuring, forward_without_sublayer

        family = self.lent.family
        for other in candidates.values():
            self.streamer.forward(index, layer, other)
        if "block_loss" in block_wanted:
            candidates[("block_loss", index)] = self.budget.copy(stream, f"without-layer-{index}")
        if "mlp_loss" in block_wanted and view is not None:
            candidate = self.budget.copy(stream, f"without-mlp-{index}")
            forward_without_sublayer(self.streamer, index, layer, candidate, family)
            candidates[("mlp_loss", index)] = candidate
        accumulator = None
        if view is not None:
            accumulator = new_accumulator(view, wanted - block_wanted, 0, self.seed, self.streamer)
            digest.add_router(view.router.weight)
        measured = forward_measuring(self.streamer, index, layer, stream, family=family, moe=view is not None,
                                     wanted=block_wanted, on_batch=on_batch,
                                     observe=observing(view, accumulator) if view is not None else None)
        entry = accumulator.finish() if accumulator is not None else {}
        return {**entry, **measured}, accumulator.tokens if accumulator is not None else 0

    def _apply(self, phase: Phase, index: int, view, stats: CalibrationStats, result: PassResult, advance) -> None:
        for position, step in phase.steps:
            report = step.apply_layer(self.lent.model, view, stats, plan=self.plans.get(position),
                                      on_progress=lambda s: advance(0, s))
            result.per_layer.setdefault(position, {})[index] = report
        agree_layer(self.lent.layers[index], self.streamer.world, index)  # every rank holds the same edit

    def _apply_on_inputs(self, phase: Phase, index: int, layer: nn.Module, view, hidden: HiddenStates,
                         result: PassResult, advance, status: str, reference: torch.Tensor | None) -> None:
        from moekit.calib.runner import LayerInputs

        inputs = LayerInputs(self.streamer, index, layer, f"{self.lent.layers_path}.{index}.", hidden,
                             on_batch=lambda b: advance(0, status), reference_logits=reference)
        for position, step in phase.steps:
            report = step.apply_layer(self.lent.model, view, None, plan=self.plans.get(position),
                                      on_progress=lambda s: advance(0, f"{status}: {s}"), inputs=inputs)
            result.per_layer.setdefault(position, {})[index] = report
        agree_layer(layer, self.streamer.world, index)  # every rank holds the same edit

    def _router_logits(self, index: int, layer: nn.Module, view, reference: HiddenStates) -> torch.Tensor | None:
        """Advance ``reference`` through the layer as it is now, returning its router's
        logits [N, E] on every token (None for a dense layer)."""
        logits: list[torch.Tensor] = []
        observe = nullcontext()
        if view is not None:
            observe = watching(view.block, lambda x: logits.append(view.router.logits(x.reshape(-1, x.shape[-1]))
                                                                   .float().cpu()))
        self.streamer.forward(index, layer, reference, observe=observe)
        if view is not None and self.streamer.world is not None:  # every rank's tokens, in one process's order
            from moekit.distributed.statistics import gather_batches

            logits = gather_batches(logits, self.streamer.world, view.num_experts, "gathering router logits")
        return torch.cat(logits) if logits else None

    def _check_router(self, index: int, digest: str) -> None:
        if self.given.meta.get("routers", {}).get(str(index)) != digest:
            raise MoekitError(f"the statistics given with {setting('stats')} were computed on another model: layer "
                              f"{index}'s router differs from theirs. Calibrate this model, or drop {setting('stats')}.")

    # -- streams and resuming ---------------------------------------------------------
    def _streams(self, count: int, work, first: int) -> tuple[list[HiddenStates], dict[int, HiddenStates]]:
        """The phases' streams, and a reference stream for each phase that reads one."""
        streams = [self.streamer.capture("stream-0")]
        streams += [self.budget.copy(streams[0], f"stream-{p}") for p in range(1, count)]
        references = {p: self.budget.copy(streams[0], f"reference-{p}") for p, phase in enumerate(self.phases[:count])
                      if phase.reads_reference}
        if first > 0:
            for stream in [*streams, *references.values()]:
                stream.load(work.hidden_folder(first - 1))
        return streams, references

    def _commit(self, work, index: int, view, streams: list[HiddenStates], result: PassResult,
                routers_before: list[int]) -> None:
        folder = work.hidden_folder(index)
        partial = folder.with_name(folder.name + ".partial")
        for stream in streams:
            stream.save(partial)
        os.replace(partial, folder)
        work.commit(index, {
            "reports": {str(pos): layers[index] for pos, layers in result.per_layer.items() if index in layers},
            "experts": view.num_experts if view is not None else None,
            "top_k": view.top_k if view is not None else None,
            "mlp_dropped": index in (getattr(self.lent.model.config, "moekit_dropped_mlp_layers", None) or []),
            "factored": (getattr(self.lent.model.config, "moekit_factored_experts", None) or {}).get(str(index)),
            "routers": [d.routers[-1] if len(d.routers) > before else None  # the phases that saw its router
                        for d, before in zip(result.digests, routers_before, strict=True)],
            "seconds": result.seconds,
        })

    def _resume(self, work, result: PassResult, last: int) -> int:
        """Replay the records of the finished layers: reports, router digests, and the
        structure of the skeleton (expert counts), so the final config is right. Returns
        the first layer to run."""
        from moekit.arch.edit import keep_experts

        done = work.finished_layers()
        if not done:
            return 0
        for index in done:
            record = work.record(index)
            for pos, report in record["reports"].items():
                result.per_layer.setdefault(int(pos), {})[index] = report
            if record.get("mlp_dropped"):  # the skeleton as the finished layers left it
                from moekit.arch.edit import drop_mlp

                drop_mlp(self.lent.model, [index])
            if record.get("top_k") is not None:
                from moekit.arch.discover import view_layer
                from moekit.arch.edit import set_top_k

                if view_layer(self.lent.model, index).top_k != record["top_k"]:
                    set_top_k(self.lent.model, {index: record["top_k"]})
            if record["experts"] is not None:
                keep_experts(self.lent.model, {index: list(range(record["experts"]))})
            if record.get("factored"):  # after the counts: experts decompose factored (`moekit.arch.factored`)
                from moekit.arch.factored import FACTORED_KEY, restore_factored

                records = dict(getattr(self.lent.model.config, FACTORED_KEY, None) or {})
                setattr(self.lent.model.config, FACTORED_KEY, {**records, str(index): record["factored"]})
                restore_factored(self.lent.model)
            for p, router in enumerate(record["routers"][: last + 1]):
                if router is not None:
                    result.digests[p].routers.append(router)
            result.seconds = record["seconds"]
        return done[-1] + 1


# -- what a compress decides before its pass --------------------------------------------
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
            collected = runner.run(collect=(p, needs), advance=advance).collected
        for pos, step in planners:
            plans[pos] = step.plan(lent.model, collected)
    work.save_plans({str(pos): {str(i): n for i, n in plan.items()} for pos, plan in plans.items()})
    return plans


def needs_native_format(model: nn.Module, recipe: Recipe, plans: dict[int, Any]) -> bool:
    """Whether the output keeps different expert counts per layer (moekit's format),
    known before the pass from the steps' counts and the plans."""
    from moekit.arch.discover import moe_layers

    from moekit.arch.edit import DROPPED_MLP_KEY, TOP_K_KEY

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
