"""A recipe's steps grouped into *phases*: a phase begins at a step that needs statistics
of the model as the steps before it left it (the first such step, and any after a
structural change). Each phase gets its own stream of calibration hidden states
(`moekit.recipe.passes`)."""

from __future__ import annotations

from dataclasses import dataclass

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
