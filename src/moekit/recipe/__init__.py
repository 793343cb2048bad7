"""Recipes: ordered, validated, YAML-round-tripping lists of compression steps."""

from moekit.recipe.recipe import Recipe, load_recipe, presets
from moekit.recipe.step import STEPS, ModelInfo, Step, register_step

__all__ = ["STEPS", "ModelInfo", "Recipe", "Step", "load_recipe", "presets", "register_step"]
