"""The config keys of moekit's own format, in one place.

A standard checkpoint describes every layer with the family's keys. What moekit's edits
make non-uniform is recorded beside them, under keys plain transformers ignores; their
presence is what makes a checkpoint moekit's format (`moekit.io.nonuniform`), and
`moekit.arch.skeleton` rebuilds a model's shapes from them.
"""

from __future__ import annotations

PER_LAYER_KEY = "moekit_num_experts_per_layer"  # {layer: routed experts kept} (`moekit.arch.edit.keep_experts`)
TOP_K_KEY = "moekit_top_k_per_layer"  # {layer: k} (`moekit.arch.edit.set_top_k`)
DROPPED_MLP_KEY = "moekit_dropped_mlp_layers"  # [layer] whose MoE sublayer was removed (`drop_mlp`)
FACTORED_KEY = "moekit_factored_experts"  # {layer: ranks} (`moekit.arch.factored`)
POLICY_KEY = "moekit_routing_policy"  # a dynamic routing policy (`moekit.methods.dynamic.install`)
QUANT_NOTE_KEY = "moekit_note"  # in quantization_config: why a mixed-precision checkpoint is moekit's (`io.compressed`)

# the keys that change the model's structure: a standard checkpoint cannot honour them
STRUCTURE_KEYS = (PER_LAYER_KEY, TOP_K_KEY, DROPPED_MLP_KEY, FACTORED_KEY)
# the keys whose values are per decoder layer (renumbered when blocks are dropped)
PER_LAYER_KEYS = (PER_LAYER_KEY, TOP_K_KEY)


def nonstandard_keys(config) -> list[str]:
    """The moekit config keys a standard transformers checkpoint cannot honour (different
    expert counts or top-k per layer, MoE sublayers removed, factored experts): their
    presence means moekit's own format (`moekit.io.nonuniform`)."""
    return [key for key in STRUCTURE_KEYS if getattr(config, key, None)]


def dropped_mlp_layers(config) -> list[int]:
    """The decoder layers whose MoE sublayer was removed (empty for a standard model)."""
    return [int(i) for i in getattr(config, DROPPED_MLP_KEY, None) or []]


def layer_top_k(config, index: int) -> int | None:
    """Decoder layer ``index``'s own top-k where moekit's format records one."""
    per_layer = getattr(config, TOP_K_KEY, None) or {}
    return int(per_layer[str(index)]) if str(index) in per_layer else None


def factored_record(config, index: int) -> dict | None:
    """Decoder layer ``index``'s factored ranks where its experts are factored."""
    return (getattr(config, FACTORED_KEY, None) or {}).get(str(index))
