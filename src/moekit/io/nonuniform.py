"""moekit's format for models whose layers keep different numbers of experts.

transformers builds every MoE layer with the one ``num_experts`` of the config, so it
cannot express a per-layer count. This format keeps everything else standard:

- ``config.json``: the family's config, ``num_experts`` = the largest count, plus
  ``moekit_num_experts_per_layer`` = {layer index: count};
- ``moekit-model.safetensors``: the state dict in transformers' in-memory (fused) names;
- ``moekit.json``: ``{"format": "moekit-nonuniform-experts", "version": 1}``.

There is deliberately no ``model.safetensors``, so plain transformers fails loudly
instead of building wrong shapes. `moekit.load` builds the model from the config, cuts
each layer to its count, then loads the weights strictly: the round trip is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from moekit.arch.edit import PER_LAYER_KEY, keep_experts

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


def load_nonuniform(folder: Path, *, dtype: torch.dtype = torch.float32, **from_config) -> nn.Module:
    """Build, cut and load a non-uniform model; ``from_config`` goes to transformers'
    ``from_config`` (e.g. ``experts_implementation``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    per_layer = {int(i): n for i, n in getattr(config, PER_LAYER_KEY, {}).items()}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **from_config)
    keep_experts(model, {i: list(range(n)) for i, n in per_layer.items()})
    load_model(model, str(folder / WEIGHTS), strict=True)
    return model.eval()
