"""A recipe: an ordered list of steps that round-trips through YAML.

    steps:
      - type: prune
        method: reap
        remove: 0.5
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr

from moekit.errors import MoekitError, read_yaml, yaml_problem
from moekit.recipe.step import Step, step_from_dict, step_label

PRESETS_DIR = Path(__file__).parent / "presets"


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True)
    steps: list[Step]
    _source: str = PrivateAttr(default="recipe")  # the file or preset it came from: errors name it

    def __eq__(self, other: object) -> bool:  # a recipe is its steps, wherever it was read from
        return isinstance(other, Recipe) and self.steps == other.steps

    __hash__ = None  # its steps are a list

    def where(self, position: int) -> str:
        """How errors name step ``position`` (from 0): ``FILE: step N (TYPE)``, as they name
        a step the recipe's own validation refuses."""
        return f"{self._source}: {step_label(self.steps[position], position)}"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "recipe") -> Recipe:
        import moekit.recipe.steps  # noqa: F401  (registers the built-in steps)

        if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
            raise MoekitError(f"{source}: a recipe is a mapping with a non-empty 'steps' list.")
        extra = sorted(set(data) - {"steps"})
        if extra:
            raise MoekitError(f"{source}: unknown top-level keys {extra}; a recipe has only 'steps'.")
        try:
            recipe = cls(steps=[step_from_dict(item, i) for i, item in enumerate(data["steps"])])
        except MoekitError as exc:
            raise MoekitError(f"{source}: {exc}") from None
        recipe._source = source
        return recipe

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "recipe") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MoekitError(f"{source} is not valid YAML ({yaml_problem(exc)}); fix the recipe.") from None
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict:
        return {"steps": [step.model_dump(mode="json") for step in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def needs(self) -> set[str]:
        return set().union(*(step.needs() for step in self.steps))


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}


def load_recipe(recipe: Recipe | str | os.PathLike | dict) -> Recipe:
    """A recipe from a Recipe, a dict, a preset name, or a YAML file path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    name = str(recipe)
    if name in presets():
        return Recipe.from_yaml(presets()[name].read_text(), source=f"preset {name}")
    path = Path(name).expanduser()
    if path.is_file():
        return Recipe.from_dict(read_yaml(path, fix="fix the recipe."), source=str(path))
    raise MoekitError(f"no recipe {name!r}: not a preset ({', '.join(presets())}) and not a file.")
