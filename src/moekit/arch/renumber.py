"""A config with fewer decoder layers: what `moekit.arch.edit.drop_blocks` writes.

Families say per layer what a layer is in different ways: lists as long as the stack
(``layer_types``, Llama-4's ``no_rope_layers``), lists of indices (Qwen's
``mlp_only_layers``, Llama-4's ``moe_layers``), or patterns (``decoder_sparse_step``,
DeepSeek's ``first_k_dense_replace``, ERNIE's ``moe_layer_start_index`` /
``moe_layer_end_index`` / ``moe_layer_interval``). `renumbered_config` rewrites each for
the kept layers, then proves the result: the family's own classes are built from the new
config on the ``meta`` device (no memory) and every new layer must have exactly the
parameters (names, shapes) and per-layer settings (attention type, sliding window, RoPE)
of the old layer it stands for. A pattern the config cannot express is refused, naming it.
"""

from __future__ import annotations

import copy
from functools import lru_cache

from moekit.arch.layout import DROPPED_MLP_KEY, PER_LAYER_KEYS, POLICY_KEY
from moekit.arch.skeleton import model_from_config
from moekit.errors import MoekitError

_LAYER_SETTINGS = ("layer_type", "attention_type", "sliding_window", "use_rope", "is_moe_layer", "is_sliding")


def layer_signatures(config) -> list[tuple]:
    """Per decoder layer of the model ``config`` builds: its parameters (names relative to
    the layer, shapes) and its per-layer settings."""
    return list(_signatures(config.to_json_string()))


@lru_cache(maxsize=16)
def _signatures(config_json: str) -> tuple:
    model = model_from_config(_config(config_json), plain=True)
    from moekit.arch.discover import decoder_stack

    _, path = decoder_stack(model)
    out = []
    for layer in model.get_submodule(path):
        params = tuple(sorted((n, tuple(p.shape)) for n, p in layer.named_parameters()))
        settings = tuple(sorted((f"{n}.{attr}", repr(getattr(m, attr))) for n, m in layer.named_modules()
                                for attr in _LAYER_SETTINGS if attr in vars(m)))
        out.append((params, settings))
    return tuple(out)


def moe_layer_indices(config) -> list[int]:
    """Decoder layers that the config makes MoE layers (moekit's dropped sublayers aside)."""
    return list(_moe_layers(config.to_json_string()))


@lru_cache(maxsize=16)
def _moe_layers(config_json: str) -> tuple[int, ...]:
    from moekit.arch.adapters import find_family

    model = model_from_config(_config(config_json), plain=True)
    family = find_family(model)
    return tuple(i for i, layer in enumerate(family.decoder_layers(model))
                 if family.is_moe_block(getattr(layer, family.block, None)))


def _config(config_json: str):
    import json

    from transformers import AutoConfig

    data = json.loads(config_json)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def renumbered_config(config, kept: list[int]):
    """A copy of ``config`` for the model that keeps only decoder layers ``kept`` (old
    indices, in order), every per-layer setting renumbered; checked by rebuilding.

    Raises:
        MoekitError: no layer or no MoE layer kept, an index out of range, or per-layer
            structure the family's config cannot express after the removal.
    """
    n = int(config.num_hidden_layers)
    kept = sorted({int(i) for i in kept})
    if not kept:
        raise MoekitError(f"dropping all {n} decoder layers leaves no model; keep at least one.")
    bad = [i for i in kept if not 0 <= i < n]
    if bad:
        raise MoekitError(f"layers {bad} do not exist; the model has decoder layers 0..{n - 1}.")
    moe = set(moe_layer_indices(config)) - {int(i) for i in getattr(config, DROPPED_MLP_KEY, None) or []}
    if not moe & set(kept):
        raise MoekitError(f"the kept layers {kept} hold no MoE layer (MoE layers: {sorted(moe)}); keep at least one "
                          "of them.")
    structural_moe = set(moe_layer_indices(config))
    new_of = {old: new for new, old in enumerate(kept)}
    new_moe = [new_of[i] for i in kept if i in structural_moe]
    new_dense = [new_of[i] for i in kept if i not in structural_moe]
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == n and all(types[i] == "linear_attention" for i in kept):
        raise MoekitError(f"every kept layer {kept} uses linear attention; transformers' cache needs at least one "
                          "attention layer of another type. Keep one.")
    out = copy.deepcopy(config)
    out.num_hidden_layers = len(kept)
    for key in ("layer_types", "no_rope_layers"):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == n:
            setattr(out, key, [value[i] for i in kept])
    if hasattr(config, "mlp_only_layers"):  # Qwen: an explicit list says it for any pattern
        out.mlp_only_layers = new_dense
        if hasattr(config, "decoder_sparse_step"):
            out.decoder_sparse_step = 1
    if isinstance(getattr(config, "moe_layers", None), list):  # Llama-4
        out.moe_layers = new_moe
    if getattr(config, "first_k_dense_replace", None) is not None:
        out.first_k_dense_replace = sum(1 for i in kept if i < config.first_k_dense_replace)
    if getattr(config, "moe_layer_start_index", None) is not None:  # ERNIE
        interval = int(getattr(config, "moe_layer_interval", 1) or 1)
        if new_moe:
            out.moe_layer_start_index = min(new_moe)
            out.moe_layer_end_index = max(new_moe)
        if interval > 1 and any((i + 1) % interval for i in new_moe):
            out.moe_layer_interval = 1  # checked below: fine when no dense layer sits between
    for key in PER_LAYER_KEYS:
        per_layer = getattr(config, key, None)
        if per_layer:
            setattr(out, key, {str(new_of[int(i)]): v for i, v in per_layer.items() if int(i) in new_of})
    policy = getattr(config, POLICY_KEY, None)  # a routing policy's per-layer values, keyed by decoder layer
    if isinstance(policy, dict):
        setattr(out, POLICY_KEY, {key: {str(new_of[int(i)]): v for i, v in value.items() if int(i) in new_of}
                               if isinstance(value, dict) and all(str(i).isdigit() for i in value) else value
                               for key, value in policy.items()})
    dropped = getattr(config, DROPPED_MLP_KEY, None)
    if dropped:
        setattr(out, DROPPED_MLP_KEY, [new_of[int(i)] for i in dropped if int(i) in new_of])
    old, new = layer_signatures(config), layer_signatures(out)
    for i, before in enumerate(kept):
        if old[before] != new[i]:
            raise MoekitError(f"{config.model_type}'s config cannot describe the model without layers "
                              f"{sorted(set(range(n)) - set(kept))}: old layer {before} would be built differently "
                              f"as layer {i}. Drop other layers.")
    return out
