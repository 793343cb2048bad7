"""moekit: make Mixture-of-Experts models smaller and faster, on every HF MoE family.

Public API::

    model = moekit.load("moekit/ref-fine")
    layers = moekit.moe_layers(model)          # list[MoELayer], depth order
    out, logits, idx, w = layers[0].forward(hidden)
    moekit.keep_experts(model, {layer_index: [expert ids]})
    moekit.save(model, "out/")
"""

from moekit.arch.discover import decoder_layers, moe_layers
from moekit.arch.edit import keep_experts, set_expert_weights, set_router_weights
from moekit.arch.layer import MoELayer
from moekit.arch.summary import summarize
from moekit.errors import MoekitError, UnsupportedModelError
from moekit.io.load import load
from moekit.io.save import save

__version__ = "0.1.0"
__all__ = [
    "MoELayer",
    "MoekitError",
    "UnsupportedModelError",
    "decoder_layers",
    "keep_experts",
    "load",
    "moe_layers",
    "save",
    "set_expert_weights",
    "set_router_weights",
    "summarize",
]
