"""Recipe steps: pydantic models (unknown fields forbidden), registered by name.

A step declares the calibration statistics it needs, checks itself against the model's
config before any weights load, and applies itself to a loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

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

    def apply(self, model: nn.Module, stats: Any, *, progress: bool = False) -> dict:
        """Edit ``model`` in place; return what to record in the report. ``progress``
        draws a bar over layers where a step's per-layer work is slow."""
        raise NotImplementedError

    @property
    def changes_structure(self) -> bool:
        return True


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` available in recipes as ``type: <cls.name>``."""
    STEPS[cls.name] = cls
    return cls


def step_from_dict(item: Any, position: int) -> Step:
    """Build a step from its YAML mapping, with a message naming the step and field."""
    from pydantic import ValidationError

    where = f"step {position + 1}"
    if not isinstance(item, dict) or "type" not in item:
        raise MoekitError(f"{where}: each step is a mapping with a 'type' (one of {sorted(STEPS)}).")
    kind = item["type"]
    if kind not in STEPS:
        raise MoekitError(f"{where}: unknown step type {kind!r}; known steps: {sorted(STEPS)}.")
    try:
        return STEPS[kind].model_validate(item)
    except ValidationError as exc:
        raise MoekitError(f"{where} ({kind}): {validation_problems(exc, default_field=kind)}") from None
