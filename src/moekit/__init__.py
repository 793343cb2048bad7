"""moekit: make Mixture-of-Experts models smaller and faster, on every HF MoE family."""

from moekit.arch.discover import decoder_layers, moe_layers
from moekit.arch.layer import MoELayer
from moekit.errors import MoekitError, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["MoELayer", "MoekitError", "UnsupportedModelError", "decoder_layers", "moe_layers"]
