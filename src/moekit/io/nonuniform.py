"""moekit's format for models whose layers differ in ways a transformers config cannot say.

transformers builds every MoE layer with the one ``num_experts`` and top-k of the config,
and every layer the config makes an MoE layer has an MLP, so it cannot express a per-layer
expert count, a per-layer top-k, or an MoE sublayer removed. This format keeps everything
else standard:

- ``config.json``: the family's config, ``num_experts`` = the largest count, plus
  ``moekit_num_experts_per_layer`` = {layer index: count}, and/or
  ``moekit_top_k_per_layer`` = {layer index: k} (the family's top-k key holds the largest),
  and/or ``moekit_dropped_mlp_layers`` = [decoder layers whose MoE sublayer was removed:
  they hold attention only], and/or ``moekit_factored_experts`` = {layer index: {"gate_up":
  [rank per expert], "down": [rank per expert], "base": bool}} (experts stored as low-rank
  factors by the ``decompose`` step: `moekit.arch.factored`);
- ``moekit-model.safetensors`` (or ``moekit-model-0000k-of-0000n.safetensors`` with
  ``moekit-model.safetensors.index.json``, as a streamed compress writes a big model):
  the state dict in transformers' in-memory (fused) names;
- ``moekit.json``: ``{"format": "moekit-nonuniform-experts", "version": 1}``.

There is deliberately no ``model.safetensors``, so plain transformers fails loudly
instead of building wrong shapes. `moekit.load` builds the model from the config, cuts
each layer to its count (and puts factored experts where they were), then loads the
weights strictly: the round trip is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_model
from torch import nn

FORMAT = "moekit-nonuniform-experts"
WEIGHTS = "moekit-model.safetensors"
MARKER = "moekit.json"


def write_nonuniform(model: nn.Module, folder: Path) -> None:
    """Write ``model`` into the existing ``folder`` in the non-uniform format."""
    model.config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS))
    (folder / MARKER).write_text(json.dumps({"format": FORMAT, "version": 1}, indent=2))


def is_nonuniform(folder: Path) -> bool:
    return (folder / MARKER).is_file()
