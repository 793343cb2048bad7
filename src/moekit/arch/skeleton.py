"""A model's structure from its config alone: the family's modules with parameters on the
``meta`` device (shapes, no memory).

`model_from_config` builds what the family's keys describe; `moekit.arch.edit.skeleton`
then applies moekit's per-layer edits the config records, and that is the one builder
planning, the steps' checks and the layer-streamed reader share, so they agree on every
shape. Dropping blocks compares layers on the plain form (`moekit.arch.renumber`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moekit.arch.layout import DROPPED_MLP_KEY, PER_LAYER_KEYS


def model_from_config(config, *, plain: bool = False, dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False, **from_config) -> nn.Module:
    """The model ``config`` describes, parameters on ``meta`` (buffers, e.g. rotary tables,
    are real: small, computed, never stored). ``plain``: ignore moekit's per-layer keys,
    building the family structure alone. ``from_config`` goes to transformers'
    ``from_config`` (e.g. ``experts_implementation``)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if plain:
        config = copy.deepcopy(config)
        for key in (*PER_LAYER_KEYS, DROPPED_MLP_KEY):
            if hasattr(config, key):
                delattr(config, key)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                **from_config)
