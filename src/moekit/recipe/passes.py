"""A recipe run as streamed passes over the model: one decoder layer at a time.

A recipe's steps fall into phases (`moekit.recipe.phases`), each with its own stream of
calibration hidden states. For decoder layer i, in phase order, stream p runs through the
layer as the phases before p left it (its statistics accumulating), then phase p's steps
edit the layer from those statistics. So stream 0 sees the original model, stream 1 the
model after phase 0, and so on — exactly the calibrations of an in-memory run, computed in
one pass with one layer in memory.

Each phase of a layer has a *source* of statistics — calibrated on its stream, given (read
from ``--stats``), the layer's own inputs (steps that run the layer themselves), or
measured (a planning pass's block losses) — and the pass a *sink* for them: `Apply` edits
the layer with the phase's steps; `Collect` keeps one phase's statistics of every layer
for a step that decides across layers (a global budget), whose `Step.plan` is then fixed
before the pass that edits and writes. Planning and editing are the same loop.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moekit.arch.layer import watching
from moekit.calib.activations import ActivationBudget, HiddenStates
from moekit.calib.calibrate import new_accumulator, observing
from moekit.calib.stats import CalibrationStats, ModelDigest
from moekit.distributed import agree_layer
from moekit.distributed.runs import layer_done
from moekit.errors import MoekitError, setting
from moekit.io.compressed import ledger
from moekit.io.layered import LayeredModel
from moekit.recipe.phases import Phase
from moekit.recipe.resume import commit_layer, replay_finished


@dataclass
class PassResult:
    """What a pass produced: per step, each layer's report; per phase, the calibration's
    model fingerprint and seconds; for a planning pass, the collected statistics."""

    per_layer: dict[int, dict[int, dict]] = field(default_factory=dict)  # step position -> layer -> report
    digests: list[ModelDigest] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    collected: CalibrationStats | None = None


@dataclass
class Apply:
    """The editing pass's sink: every phase's steps edit the layer from its statistics."""

    @property
    def last_phase(self) -> int | None:
        return None


@dataclass
class Collect:
    """A planning pass's sink: phases before ``phase`` edit as usual; that phase's
    statistics ``names`` of every layer are kept instead of applied (or what its planning
    steps measure from them, `Step.plan_measure`)."""

    phase: int
    names: frozenset[str]
    stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    candidates: dict[tuple[str, int], HiddenStates] = field(default_factory=dict)  # streams skipping one sublayer

    @property
    def last_phase(self) -> int:
        return self.phase

    @property
    def block_names(self) -> frozenset[str]:
        from moekit.calib.blocks import BLOCK_STATISTICS

        return frozenset(self.names & set(BLOCK_STATISTICS))

    def keep(self, index: int, stats: dict[str, torch.Tensor], tokens: int) -> None:
        self.stats[index], self.tokens[index] = stats, tokens


@dataclass
class _Run:
    """One pass's state: the phases it runs, the blocks they drop, the streams, the result."""

    last: int
    dropped: dict[int, int]
    streams: list[HiddenStates]
    references: dict[int, HiddenStates]
    result: PassResult
    advance: Any


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
            calibrating (checked by `moekit.recipe.decisions.check_given` before the
            pass); each layer's router must match the one they were computed on.
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

    def run(self, *, sink: Apply | Collect | None = None, writer=None, work=None,
            advance=lambda n=1, status=None: None, on_layer=None) -> PassResult:
        """One pass into ``sink`` (default `Apply`). ``writer`` (a `ShardWriter`) gets each
        finished layer; ``work`` (a `WorkFolder`) makes the pass resumable;
        ``on_layer(index)`` follows each finished (and, with ``work``, committed) layer."""
        sink = sink or Apply()
        last = len(self.phases) - 1 if sink.last_phase is None else sink.last_phase
        result = PassResult(digests=[ModelDigest(self.lent.model.config) for _ in range(last + 1)],
                            seconds=[0.0] * (last + 1))
        first = replay_finished(work, self.lent.model, result, last) if work is not None else 0
        run = _Run(last, self.dropped_blocks(last), *self._streams(last + 1, work, first), result, advance)
        for index, layer in self.streamer.layers(first):
            routers_before = [len(d.routers) for d in result.digests]
            for p in range(last + 1):
                if index in run.dropped and run.dropped[index] < p:  # an earlier phase dropped the block
                    continue
                self._phase(p, index, layer, run, sink)
            self._finish_layer(index, run, writer, work, routers_before)
            if on_layer is not None:
                on_layer(index)
        if isinstance(sink, Collect):
            result.collected = self._collected(sink, run)
        return result

    def dropped_blocks(self, last: int | None = None) -> dict[int, int]:
        """{decoder layer: the phase whose step drops it} for the phases up to ``last``."""
        out: dict[int, int] = {}
        for q, phase in enumerate(self.phases[: None if last is None else last + 1]):
            for position, step in phase.steps:
                for index in step.blocks_dropped(self.plans.get(position)):
                    out.setdefault(int(index), q)
        return out

    # -- one phase of one layer: a source of statistics, then the sink ----------------------
    def _phase(self, p: int, index: int, layer: nn.Module, run: _Run, sink: Apply | Collect) -> None:
        from moekit.arch.discover import view_layer

        view = view_layer(self.lent.model, index)  # an earlier phase may have dropped its MoE sublayer
        start = time.perf_counter()
        status = f"layer {index + 1}/{len(self.lent)}" + (f", phase {p + 1}" if run.last else "")
        on_batch = lambda b: run.advance(1, status)  # noqa: E731
        phase, stream = self.phases[p], run.streams[p]
        collecting = isinstance(sink, Collect) and p == sink.phase
        if collecting and sink.block_names:  # measured: the layer's block statistics
            sink.keep(index, *self._measure_block(index, layer, view, stream, sink, run.result.digests[p], on_batch))
        elif phase.reads_inputs and not collecting:  # the steps run the layer, then the stream goes through it
            if view is not None:
                run.result.digests[p].add_router(view.router.weight)
            reference = self._router_logits(index, layer, view, run.references[p]) if p in run.references else None
            self._apply_on_inputs(phase, index, layer, view, stream, run, status, reference)
            self.streamer.forward(index, layer, stream, on_batch=on_batch)
            run.result.seconds[p] += time.perf_counter() - start
        elif view is None:  # a dense layer: the stream goes through
            self.streamer.forward(index, layer, stream, on_batch=on_batch)
        else:
            stats, tokens = self._statistics(p, index, layer, view, stream, sink, run, on_batch, status)
            if not (p == 0 and self.given is not None):  # given statistics cost no time
                run.result.seconds[p] += time.perf_counter() - start
            if collecting:
                sink.keep(index, self._planned(phase, view, stats), tokens)
            else:
                self._apply(phase, index, view, stats, run)

    def _statistics(self, p: int, index: int, layer: nn.Module, view, stream: HiddenStates, sink, run: _Run,
                    on_batch, status: str) -> tuple[CalibrationStats, int]:
        """Phase ``p``'s statistics of MoE layer ``index``: given (stream 0 idles), or
        calibrated on its stream as the layer goes through."""
        digest = run.result.digests[p]
        if p == 0 and self.given is not None:
            run.advance(len(stream), status)
            digest.add_router(view.router.weight)
            self._check_router(index, digest.routers[-1])
            stats = self.given.only(index)
            return stats, stats.tokens[index]
        collecting = isinstance(sink, Collect) and p == sink.phase
        wanted = sink.names if collecting else self.phases[p].wanted
        sample = self.phases[p].hidden_sample if isinstance(sink, Apply) or "hidden_sample" in wanted else 0
        accumulator = new_accumulator(view, wanted, sample, self.seed, self.streamer)
        digest.add_router(view.router.weight)
        self.streamer.forward(index, layer, stream, observe=observing(view, accumulator), on_batch=on_batch)
        stats = CalibrationStats({index: accumulator.finish()}, {index: accumulator.tokens},
                                 meta={**self.stats_meta, "statistics": sorted(wanted)})
        return stats, accumulator.tokens

    def _apply(self, phase: Phase, index: int, view, stats: CalibrationStats, run: _Run) -> None:
        for position, step in phase.steps:
            report = step.apply_layer(self.lent.model, view, stats, plan=self.plans.get(position),
                                      on_progress=lambda s: run.advance(0, s))
            run.result.per_layer.setdefault(position, {})[index] = report
        agree_layer(self.lent.layers[index], self.streamer.world, index)  # every rank holds the same edit

    def _apply_on_inputs(self, phase: Phase, index: int, layer: nn.Module, view, hidden: HiddenStates, run: _Run,
                         status: str, reference: torch.Tensor | None) -> None:
        from moekit.calib.runner import LayerInputs

        inputs = LayerInputs(self.streamer, index, layer, f"{self.lent.layers_path}.{index}.", hidden,
                             on_batch=lambda b: run.advance(0, status), reference_logits=reference)
        for position, step in phase.steps:
            report = step.apply_layer(self.lent.model, view, None, plan=self.plans.get(position),
                                      on_progress=lambda s: run.advance(0, f"{status}: {s}"), inputs=inputs)
            run.result.per_layer.setdefault(position, {})[index] = report
        agree_layer(layer, self.streamer.world, index)  # every rank holds the same edit

    # -- what a planning pass keeps ---------------------------------------------------------
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

    def _measure_block(self, index: int, layer: nn.Module, view, stream: HiddenStates, sink: Collect,
                       digest: ModelDigest, on_batch) -> tuple[dict[str, torch.Tensor], int]:
        """A planning pass's statistics of decoder layer ``index``, dense or MoE: its MoE
        statistics (when it has experts) and the layer's `moekit.calib.blocks` ones; the
        sink's candidates are the streams that each skip one earlier layer (loss criteria):
        they go through this layer, and this layer's own start here."""
        from moekit.calib.blocks import forward_measuring, forward_without_sublayer

        family, block_wanted = self.lent.family, sink.block_names
        for other in sink.candidates.values():
            self.streamer.forward(index, layer, other)
        if "block_loss" in block_wanted:
            sink.candidates[("block_loss", index)] = self.budget.copy(stream, f"without-layer-{index}")
        if "mlp_loss" in block_wanted and view is not None:
            candidate = self.budget.copy(stream, f"without-mlp-{index}")
            forward_without_sublayer(self.streamer, index, layer, candidate, family)
            sink.candidates[("mlp_loss", index)] = candidate
        accumulator = None
        if view is not None:
            accumulator = new_accumulator(view, sink.names - block_wanted, 0, self.seed, self.streamer)
            digest.add_router(view.router.weight)
        measured = forward_measuring(self.streamer, index, layer, stream, family=family, moe=view is not None,
                                     wanted=block_wanted, on_batch=on_batch,
                                     observe=observing(view, accumulator) if view is not None else None)
        entry = accumulator.finish() if accumulator is not None else {}
        return {**entry, **measured}, accumulator.tokens if accumulator is not None else 0

    def _collected(self, sink: Collect, run: _Run) -> CalibrationStats:
        if sink.candidates:  # each candidate stream skipped one layer (sublayer): its loss against the model's
            from moekit.calib.blocks import mean_loss

            base = mean_loss(self.streamer, run.streams[run.last])
            for (name, index), stream in sink.candidates.items():
                sink.stats[index][name] = torch.tensor([mean_loss(self.streamer, stream) - base])
        return CalibrationStats(sink.stats, sink.tokens, meta={"statistics": sorted(sink.names)})

    # -- around each layer --------------------------------------------------------------
    def _finish_layer(self, index: int, run: _Run, writer, work, routers_before: list[int]) -> None:
        """Write the finished layer (a planning pass writes nothing, and a dropped block is
        not written: what the steps left for the writer goes), then commit it to ``work``."""
        from moekit.arch.discover import view_layer

        if writer is not None and index not in run.dropped:
            writer.write_layer(index, f"{self.lent.layers_path}.{index}.",
                               as_index=index - sum(1 for i in run.dropped if i < index))
        else:
            ledger(self.lent.model).discard(f"{self.lent.layers_path}.{index}.")
        if work is not None:  # the layer as the steps left it (a step may have changed its top-k or sublayer)
            layer_done(self.streamer.world, index)  # ranks commit a layer only once all have computed it
            commit_layer(work, self.lent.model, index, view_layer(self.lent.model, index),
                         [*run.streams, *run.references.values()], run.result, routers_before)

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
            from moekit.distributed.collectives import gather_batches

            logits = gather_batches(logits, self.streamer.world, view.num_experts, "gathering router logits")
        return torch.cat(logits) if logits else None

    def _check_router(self, index: int, digest: str) -> None:
        if self.given.meta.get("routers", {}).get(str(index)) != digest:
            raise MoekitError(f"the statistics given with {setting('stats')} were computed on another model: layer "
                              f"{index}'s router differs from theirs. Calibrate this model, or drop {setting('stats')}.")

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
