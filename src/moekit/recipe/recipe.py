"""A recipe: an ordered list of steps that round-trips through YAML.

    steps:
      - type: prune
        method: reap
        remove: 0.5
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr

from moekit.errors import MoekitError, read_yaml, yaml_problem
from moekit.recipe.step import ModelInfo, Step, step_from_dict, step_label

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


# -- a recipe against a model, from its config alone -------------------------------------
def model_info(config: Any) -> ModelInfo:
    """Experts, top-k and groups from a config alone (recipes are checked before loading)."""
    from moekit.arch.adapters import FAMILIES, not_an_moe

    model_type = getattr(config, "model_type", None)
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if family is None:
        raise MoekitError(not_an_moe(model_type, f"model_type {model_type!r}"))
    top_k = int(getattr(config, family.top_k_key))
    spec = family.routing.resolve(config, top_k)
    return ModelInfo(family=family.name, num_experts=int(getattr(config, family.num_experts_key)),
                     top_k=top_k, routing=spec, config=config)


def checked_recipe(name: str, recipe: Recipe | str | os.PathLike | dict) -> tuple[Recipe, Any]:
    """The recipe, checked step by step against ``name``'s config (no weights read), each
    step against the expert count the steps before it leave; returns it with that config."""
    from moekit.arch.layout import FACTORED_KEY
    from moekit.io.load import load_config

    recipe = load_recipe(recipe)
    config = load_config(name)
    info = model_info(config)
    factored = bool(getattr(config, FACTORED_KEY, None))  # experts held as factors edit no further
    for position, step in enumerate(recipe.steps):
        try:
            if factored and step.type in ("prune", "merge", "quantize", "decompose"):
                raise MoekitError(f"{step.type} cannot follow decompose: factored experts are not edited further. "
                                  f"Put {step.type} before decompose, or give decompose materialize: true.")
            step.check(info)
        except MoekitError as exc:  # named as the recipe's own validation names a step (each check says its type)
            raise MoekitError(f"{recipe.where(position)}: {str(exc).removeprefix(f'{step.type}: ')}") from None
        factored = factored or (step.type == "decompose" and not step.materialize)
        top_k = step.top_k_after(info.top_k)
        info = dataclasses.replace(info, num_experts=step.kept_per_layer(info.num_experts),  # what the next sees
                                   top_k=top_k, routing=dataclasses.replace(info.routing, top_k=top_k))
    return recipe, config
