"""Built-in steps; importing this module registers them."""

from moekit.recipe.steps.decompose import Decompose
from moekit.recipe.steps.drop import DropBlocks, DropLayers
from moekit.recipe.steps.dynamic import RoutingPolicyStep
from moekit.recipe.steps.merge import Merge
from moekit.recipe.steps.prune import Prune
from moekit.recipe.steps.quantize import Quantize
from moekit.recipe.steps.topk import TopK

__all__ = ["Decompose", "DropBlocks", "DropLayers", "Merge", "Prune", "Quantize", "RoutingPolicyStep", "TopK"]
