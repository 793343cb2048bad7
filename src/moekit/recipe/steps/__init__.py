"""Built-in steps; importing this module registers them."""

from moekit.recipe.steps.merge import Merge
from moekit.recipe.steps.prune import Prune
from moekit.recipe.steps.quantize import Quantize

__all__ = ["Merge", "Prune", "Quantize"]
