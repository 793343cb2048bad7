"""A stand-in decoder layer that returns its input: the original model run without a layer,
the brute-force reference for dropping blocks."""

from __future__ import annotations

from torch import nn


class SkippedLayer(nn.Module):
    """Returns the hidden states it gets; attributes the model reads (``attention_type``,
    ``layer_idx``...) come from the layer it replaces, held outside the module tree."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.wrapped = [layer]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped[0], name)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states
