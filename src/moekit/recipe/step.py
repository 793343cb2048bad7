"""Recipe steps: pydantic models (unknown fields forbidden), registered by name.

A step declares the calibration statistics it needs, checks itself against the model's
config before any weights load, and edits one decoder layer at a time (`apply_layer`):
compression streams the model layer by layer, so a step never sees the whole model's
weights at once. A step that decides something across layers (a global budget) says
which statistics that decision needs (`plan_needs`); a first streamed pass collects them
for every layer and `plan` decides, before the pass that edits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from moekit.arch.layer import MoELayer
from moekit.arch.routing import RoutingSpec
from moekit.errors import MoekitError, validation_problems

STEPS: dict[str, type[Step]] = {}


@dataclass(frozen=True)
class ModelInfo:
    """What a step may check before weights load, read from the config alone."""

    family: str
    num_experts: int
    top_k: int
    routing: RoutingSpec
    config: Any = None  # the model's config, for checks that need widths

    @property
    def n_group(self) -> int:
        return self.routing.n_group


class Step(BaseModel):
    """Base of every recipe step; ``type`` names it in YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str
    name: ClassVar[str] = ""

    def needs(self) -> set[str]:
        """Calibration statistics this step reads."""
        return set()

    def hidden_sample(self) -> int:
        """Input hidden states per layer this step reads (0: none)."""
        return 0

    @property
    def reads_inputs(self) -> bool:
        """True for a step that runs each whole decoder layer (dense ones too) on its
        calibration inputs itself: `apply_layer` then gets ``inputs`` (a
        `moekit.calib.runner.LayerInputs`) before the stream goes through the layer, and no
        statistics."""
        return False

    @property
    def reads_reference(self) -> bool:
        """True for a `reads_inputs` step that also compares with the layer as the steps
        before it left it: ``inputs.reference_logits`` then holds that layer's router logits
        on the hidden states of a stream that never went through this step's edits."""
        return False

    def check(self, info: ModelInfo) -> None:
        """Raise MoekitError if the step cannot apply to this model."""

    def kept_per_layer(self, num_experts: int) -> int:
        """Experts a layer of ``num_experts`` keeps after this step, known before any
        calibration (`moekit.plan` reads it); steps that keep the structure return it unchanged."""
        return num_experts

    @property
    def counts_known_in_advance(self) -> bool:
        """False when calibration decides how many experts each layer keeps (only their
        total is known in advance)."""
        return True

    def plan_needs(self) -> set[str]:
        """Statistics of every layer that `plan` reads (empty: the step decides layer by
        layer, and no first pass is needed)."""
        return set()

    def plan(self, model: nn.Module, stats: Any) -> Any:
        """Decide what needs all layers' statistics at once (``stats`` holds `plan_needs`
        for every MoE layer; ``model``'s weights may be absent: read shapes and routing
        only). The result reaches `apply_layer` as ``plan``."""
        return None

    def plan_measure(self, layer: MoELayer, stats: Any) -> dict:
        """What a planning pass keeps of layer ``layer.index`` for `plan` in place of its
        `plan_needs` statistics ``stats``, measured while the layer's weights are lent (empty:
        keep the statistics). For a plan that reads the layer's weights and calibration
        inputs: a hidden sample of every layer would not fit in memory, a summary does."""
        return {}

    def top_k_after(self, top_k: int) -> int:
        """The top-k every MoE layer has after this step, known before any calibration
        (the largest, where layers differ): later steps are checked against it."""
        return top_k

    def blocks_dropped(self, plan: Any) -> set[int]:
        """Decoder layers this step removes whole (`moekit.arch.edit.drop_blocks`): a
        streamed pass then lets later phases' streams skip them, does not write them and
        renumbers the layers after them."""
        return set()

    def writes_native(self, model: nn.Module, plan: Any) -> bool:
        """True when the result needs moekit's own format (something a standard config
        cannot say, e.g. a different top-k per layer), known before the pass from the
        skeleton ``model`` and the step's plan."""
        return False

    def report_plan(self, plan: Any) -> dict:
        """What the step's report says about its cross-layer decision (``plan``)."""
        return {}

    def apply_layer(self, model: nn.Module, layer: MoELayer, stats: Any, *, plan: Any = None,
                    on_progress: Callable[[str], None] | None = None) -> dict:
        """Edit decoder layer ``layer.index`` of ``model`` in place (through `moekit.arch.edit`),
        from ``stats`` (its layer's statistics); return what to record in the report for
        this layer. ``on_progress(status)`` reports slow per-layer work."""
        raise NotImplementedError

    def report(self, per_layer: dict[int, dict]) -> dict:
        """The step's report from each layer's `apply_layer` result: ``{key: {layer: value}}``."""
        keys = dict.fromkeys(k for result in per_layer.values() for k in result)
        return {k: {str(i): r[k] for i, r in per_layer.items() if k in r} for k in keys}

    def apply(self, model: nn.Module, stats: Any, *, progress: bool = False) -> dict:
        """Edit a model held in memory, every MoE layer in turn, from statistics of all of
        its layers: `plan`, then `apply_layer` per layer, as compression does while streaming."""
        from moekit.arch.discover import moe_layers
        from moekit.progress import progress_bar

        decided = self.plan(model, stats) if self.plan_needs() else None
        layers = moe_layers(model)
        results = {}
        with progress_bar(self.type, total=len(layers), unit="layer", enabled=progress) as advance:
            for layer in layers:
                results[layer.index] = self.apply_layer(model, layer, stats.only(layer.index), plan=decided)
                advance(1, f"layer {layer.index}")
        return self.report(results)

    @property
    def changes_structure(self) -> bool:
        return True


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` available in recipes as ``type: <cls.name>``."""
    STEPS[cls.name] = cls
    return cls


def step_label(step: Step | str | None, position: int) -> str:
    """``step N (TYPE)``: how a recipe's errors name its step at ``position`` (from 0)."""
    kind = step if isinstance(step, str) or step is None else step.type
    return f"step {position + 1}" + (f" ({kind})" if kind else "")


def step_from_dict(item: Any, position: int) -> Step:
    """Build a step from its YAML mapping, with a message naming the step and field."""
    from pydantic import ValidationError

    where = step_label(None, position)
    if not isinstance(item, dict) or "type" not in item:
        raise MoekitError(f"{where}: each step is a mapping with a 'type' (one of {sorted(STEPS)}).")
    kind = item["type"]
    if kind not in STEPS:
        raise MoekitError(f"{where}: unknown step type {kind!r}; known steps: {sorted(STEPS)}.")
    try:
        return STEPS[kind].model_validate(item)
    except ValidationError as exc:
        raise MoekitError(f"{step_label(kind, position)}: {validation_problems(exc, default_field=kind)}") from None
