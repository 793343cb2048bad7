"""moekit: make Mixture-of-Experts models smaller and faster, on every HF MoE family.

Public API::

    model = moekit.load("moekit/ref-fine")
    layers = moekit.moe_layers(model)          # list[MoELayer], depth order
    out, logits, idx, w = layers[0].forward(hidden)
    moekit.keep_experts(model, {layer_index: [expert ids]})
    moekit.save(model, "out/")

Names resolve lazily, so that ``import moekit`` (and ``moekit --help``) does not pay for
importing torch and transformers until they are used.
"""

from typing import TYPE_CHECKING

_API = {
    "MoELayer": "moekit.arch.layer",
    "MoekitError": "moekit.errors",
    "UnsupportedModelError": "moekit.errors",
    "decoder_layers": "moekit.arch.discover",
    "moe_layers": "moekit.arch.discover",
    "keep_experts": "moekit.arch.edit",
    "set_expert_weights": "moekit.arch.edit",
    "set_router_weights": "moekit.arch.edit",
    "materialize": "moekit.arch.factored",
    "summarize": "moekit.arch.summary",
    "load": "moekit.io.load",
    "calibrate": "moekit.calib.calibrate",
    "analyze": "moekit.analyze.run",
    "CalibrationStats": "moekit.calib.stats",
    "evaluate": "moekit.eval.perplexity",
    "compress": "moekit.compression",
    "plan": "moekit.planning",
    "Recipe": "moekit.recipe.recipe",
    "save": "moekit.io.save",
    "set_routing_policy": "moekit.methods.dynamic.install",
    "offload": "moekit.runtime.offload",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> object:
    if name == "__version__":
        from moekit.version import installed_version

        globals()[name] = value = installed_version()
        return value
    if name in _API:
        from importlib import import_module

        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API alone: not this module's helpers, nor the subpackages Python adds as
    attributes once they are imported."""
    return sorted([*__all__, "__version__"])


if TYPE_CHECKING:
    from moekit.arch.discover import decoder_layers, moe_layers
    from moekit.arch.edit import keep_experts, set_expert_weights, set_router_weights
    from moekit.arch.factored import materialize
    from moekit.arch.layer import MoELayer
    from moekit.arch.summary import summarize
    from moekit.errors import MoekitError, UnsupportedModelError
    from moekit.calib.calibrate import calibrate
    from moekit.analyze.run import analyze
    from moekit.calib.stats import CalibrationStats
    from moekit.compression import compress
    from moekit.planning import plan
    from moekit.eval.perplexity import evaluate
    from moekit.recipe.recipe import Recipe
    from moekit.io.load import load
    from moekit.io.save import save

del TYPE_CHECKING  # the namespace holds the public API (and private helpers), nothing else
