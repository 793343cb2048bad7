"""The only place that changes a model's structure, and keeps its config consistent.

Methods compute *which* experts to keep or *what* their new weights are as plain
tensors; they call these functions to apply the result, so that every family's quirks
(correction biases shaped [1, E], routers that are `nn.Linear`, expert counters cached
on modules, config aliases) are handled once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moekit.arch.adapters import find_family
from moekit.arch.discover import moe_layers
from moekit.arch.layer import MoELayer
from moekit.arch.layout import DROPPED_MLP_KEY, PER_LAYER_KEY, TOP_K_KEY
from moekit.errors import MoekitError

# Attributes under which HF modules cache the number of experts (block, router, experts,
# and the CausalLM itself, whose aux-loss path reads `self.num_experts`).
_COUNTERS = ("num_experts", "num_local_experts", "n_routed_experts")
_EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias", "up_proj", "up_proj_bias")



def keep_experts(model: nn.Module, keep: Mapping[int, Sequence[int]]) -> None:
    """Keep only the listed experts in each listed decoder layer, in their original order.

    Slices router rows, router bias, selection-only correction bias, expert tensors and
    their biases; shared experts stay. Updates every cached expert counter and the
    config (``num_experts`` and its aliases), so that the edited model is an ordinary
    model of its family. Layers not in ``keep`` are unchanged.

    Args:
        model: a model of a supported family (edited in place).
        keep: ``{decoder layer index: expert ids to keep}``.

    Raises:
        MoekitError: before anything changes, if a layer is not an MoE layer, a list is
            empty, has duplicates or ids out of range, keeps fewer experts than top-k,
            or breaks group-limited routing.
    """
    layers = {layer.index: layer for layer in moe_layers(model)}
    plan = {index: _validated(layers, index, ids) for index, ids in keep.items()}
    for index, ids in plan.items():
        _slice_layer(layers[index], torch.tensor(ids, dtype=torch.long))
    sync_expert_counts(model)


def sync_expert_counts(model: nn.Module) -> None:
    """Make the config and every cached counter agree with the experts each layer holds.

    With the same count E in every MoE layer, ``config.<num_experts_key> = E``. Plain
    transformers cannot express different counts per layer, so then the config keeps
    the largest count and records the per-layer counts under ``moekit_num_experts_per_layer``
    (which `moekit.io.save` refuses to write as a standard checkpoint).
    """
    family = find_family(model)
    layers = moe_layers(model)
    counts = {layer.index: layer.num_experts for layer in layers}
    for layer in layers:
        _set_counters(layer.block, layer.num_experts)
    largest = max(counts.values())
    setattr(model.config, family.num_experts_key, largest)
    if len(set(counts.values())) == 1:
        if hasattr(model.config, PER_LAYER_KEY):
            delattr(model.config, PER_LAYER_KEY)
    else:
        setattr(model.config, PER_LAYER_KEY, {str(i): n for i, n in counts.items()})
    blocks = {id(m) for layer in layers for m in layer.block.modules()}
    for module in model.modules():
        if id(module) not in blocks:
            _set_counters(module, largest, only_existing=True)


def experts_per_layer(model: nn.Module) -> dict[int, int]:
    """``{decoder layer index: number of routed experts}``."""
    return {layer.index: layer.num_experts for layer in moe_layers(model)}


@torch.no_grad()
def set_expert_weights(
    model: nn.Module,
    layer_index: int,
    expert: int,
    *,
    gate: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> None:
    """Overwrite one expert's tensors in place, given in canonical orientation.

    Shapes: ``gate``/``up`` [I, H], ``down`` [H, I], ``gate_bias``/``up_bias`` [I],
    ``down_bias`` [H]. Tensors not given stay as they are.
    """
    layer = _layer(model, layer_index)
    _check_expert(layer, expert)
    experts = layer.experts
    targets = {
        "gate": (experts.gate, gate),
        "up": (experts.up, up),
        "down": (experts.down, down),
        "gate_bias": (experts.gate_bias, gate_bias),
        "up_bias": (experts.up_bias, up_bias),
        "down_bias": (experts.down_bias, down_bias),
    }
    for name, (view, value) in targets.items():
        if value is None:
            continue
        if view is None:
            raise MoekitError(f"layer {layer_index} experts have no {name}; pass {name}=None.")
        _copy_checked(view[expert], value, f"{name} of expert {expert} in layer {layer_index}")


@torch.no_grad()
def set_router_weights(
    model: nn.Module,
    layer_index: int,
    expert: int,
    *,
    weight: torch.Tensor | None = None,
    bias: float | torch.Tensor | None = None,
    correction_bias: float | torch.Tensor | None = None,
) -> None:
    """Overwrite one expert's router row ``weight [H]``, router bias and correction bias."""
    layer = _layer(model, layer_index)
    _check_expert(layer, expert)
    router = layer.router
    for name, view, value in (
        ("router weight", router.weight, weight),
        ("router bias", router.bias, bias),
        ("correction bias", router.correction_bias, correction_bias),
    ):
        if value is None:
            continue
        if view is None:
            raise MoekitError(f"layer {layer_index}'s router has no {name}; pass None for it.")
        _copy_checked(view[expert], torch.as_tensor(value), f"{name} of expert {expert} in layer {layer_index}")


# -- validation ---------------------------------------------------------------------
def _validated(layers: Mapping[int, MoELayer], index: int, ids: Sequence[int]) -> list[int]:
    if index not in layers:
        raise MoekitError(
            f"layer {index} has no routed experts; MoE layers are {sorted(layers)}."
        )
    layer = layers[index]
    ids = [int(i) for i in ids]
    E, k = layer.num_experts, layer.top_k
    if not ids:
        raise MoekitError(f"layer {index}: the list of experts to keep is empty; keep at least top-k = {k}.")
    if len(set(ids)) != len(ids):
        raise MoekitError(f"layer {index}: expert ids to keep contain duplicates: {ids}.")
    bad = [i for i in ids if not 0 <= i < E]
    if bad:
        raise MoekitError(f"layer {index}: expert ids {bad} are out of range; the layer has experts 0..{E - 1}.")
    if len(ids) < k:
        raise MoekitError(
            f"layer {index}: keeping {len(ids)} experts, fewer than top-k = {k}; every token routes to "
            f"{k} experts, so keep at least {k}."
        )
    ids = sorted(ids)
    _check_groups(layer, ids)
    return ids


def _check_groups(layer: MoELayer, ids: list[int]) -> None:
    """Group-limited routing takes contiguous blocks of E / n_group experts as groups;
    keeping the same number from every group keeps each expert in its group."""
    spec = layer.router.spec
    if not spec.grouped:
        return
    size = layer.num_experts // spec.n_group
    per_group = [sum(1 for i in ids if i // size == g) for g in range(spec.n_group)]
    if len(set(per_group)) != 1:
        raise MoekitError(
            f"layer {layer.index} routes within {spec.n_group} expert groups of {size}; the kept experts "
            f"per group are {per_group}. Keep the same number from every group."
        )
    if problem := spec.kept_count_problem(per_group[0]):
        raise MoekitError(f"layer {layer.index}: {problem}.")


def _layer(model: nn.Module, layer_index: int) -> MoELayer:
    layers = {layer.index: layer for layer in moe_layers(model)}
    if layer_index not in layers:
        raise MoekitError(f"layer {layer_index} has no routed experts; MoE layers are {sorted(layers)}.")
    return layers[layer_index]


def _check_expert(layer: MoELayer, expert: int) -> None:
    if not 0 <= expert < layer.num_experts:
        raise MoekitError(f"expert {expert} is out of range; layer {layer.index} has {layer.num_experts} experts.")


def _copy_checked(view: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(view.shape) != tuple(value.shape):
        raise MoekitError(f"{what}: expected shape {tuple(view.shape)}, got {tuple(value.shape)}.")
    view.copy_(value.to(view.dtype))


# -- surgery ------------------------------------------------------------------------
def _slice_layer(layer: MoELayer, ids: torch.Tensor) -> None:
    experts = layer.experts.module
    for name in _EXPERT_TENSORS:
        _index_tensor(experts, name, ids, dim=0)
    router = layer.router.module
    _index_tensor(router, "weight", ids, dim=0)
    _index_tensor(router, "bias", ids, dim=0)
    if isinstance(router, nn.Linear):
        router.out_features = len(ids)
    if layer.router.correction_bias_path is not None:
        owner_path, _, name = layer.router.correction_bias_path.rpartition(".")
        owner = router.get_submodule(owner_path) if owner_path else router
        _index_tensor(owner, name, ids, dim=-1)
    _set_counters(layer.block, len(ids))


def _index_tensor(module: nn.Module, name: str, ids: torch.Tensor, dim: int) -> None:
    """Replace parameter or buffer ``name`` by its slice along ``dim`` (a copy, so the
    dropped experts' memory is freed)."""
    tensor = getattr(module, name, None)
    if tensor is None:
        return
    sliced = tensor.detach().index_select(dim, ids.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        setattr(module, name, sliced)


def _set_counters(root: nn.Module, value: int, only_existing: bool = False) -> None:
    """Set the cached expert counters of ``root`` and its submodules (``only_existing``:
    of ``root`` alone)."""
    for module in [root] if only_existing else root.modules():
        for name in _COUNTERS:
            current = getattr(module, name, None)
            if isinstance(current, int) and not isinstance(current, bool):
                setattr(module, name, value)


# -- fewer expert calls: top-k, dropped MLP sublayers, dropped decoder blocks ------------
_TOP_K_COUNTERS = ("top_k", "num_experts_per_tok")


def set_top_k(model: nn.Module, top_k: Mapping[int, int]) -> None:
    """Route each listed MoE layer's tokens to ``top_k[layer]`` experts from now on.

    The router keeps its semantics (a softmax over all experts then top-k, or top-k of
    logits then a softmax over the k, renormalisation, scaling): only k changes, as if
    the model had been configured with it. With one k in every MoE layer the config's
    top-k key says it (a standard checkpoint); otherwise that key holds the largest k and
    ``moekit_top_k_per_layer`` each layer's (moekit's format).

    Raises:
        MoekitError: before anything changes, for a layer without routed experts, k below
            1 or above the layer's current top-k, or a router whose transformers code
            fixes k (PhiMoE's sparsemixer).
    """
    layers = {layer.index: layer for layer in moe_layers(model)}
    for index, k in top_k.items():
        if index not in layers:
            raise MoekitError(f"layer {index} has no routed experts; MoE layers are {sorted(layers)}.")
        current = layers[index].top_k
        if not 1 <= int(k) <= current:
            raise MoekitError(f"layer {index}: top-k {k} is outside 1..{current} (its current top-k); "
                              f"choose a k from 1 to {current}.")
        if layers[index].router.spec.scoring == "sparsemixer" and int(k) != current:
            raise MoekitError(f"layer {index}: its sparsemixer router always picks {current} experts in "
                              "transformers' code, so its top-k cannot change.")
    family = find_family(model)
    ks = {i: layer.top_k for i, layer in layers.items()}
    ks.update({int(i): int(k) for i, k in top_k.items()})
    for index, k in top_k.items():
        for module in layers[index].block.modules():
            for name in _TOP_K_COUNTERS:
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, int(k))
    setattr(model.config, family.top_k_key, max(ks.values()))
    if len(set(ks.values())) == 1:
        if hasattr(model.config, TOP_K_KEY):
            delattr(model.config, TOP_K_KEY)
    else:
        setattr(model.config, TOP_K_KEY, {str(i): k for i, k in sorted(ks.items())})


class DroppedMLP(nn.Module):
    """Stands where a removed MoE sublayer was: adds nothing to the residual stream (its
    output is zeros), holds no weights and computes nothing else. ``pair``: the family's
    decoder layer unpacks (output, router scores) from its block."""

    def __init__(self, pair: bool = False) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.pair else out


def drop_mlp(model: nn.Module, indices: Sequence[int]) -> None:
    """Remove the MoE sublayer (router, routed and shared experts) of the listed decoder
    layers; their attention stays. The layer then adds only attention to the residual
    stream. Recorded in the config as ``moekit_dropped_mlp_layers`` (no transformers
    config can say "no MLP here", so the result is saved in moekit's format).

    Raises:
        MoekitError: before anything changes, for a layer without routed experts, or when
            no MoE layer would be left.
    """
    family = find_family(model)
    layers = {layer.index: layer for layer in moe_layers(model)}
    indices = sorted({int(i) for i in indices})
    bad = [i for i in indices if i not in layers]
    if bad:
        raise MoekitError(f"layers {bad} have no routed experts to drop; MoE layers are {sorted(layers)}.")
    if len(indices) == len(layers):
        raise MoekitError(f"dropping the MoE sublayers of all {len(layers)} MoE layers leaves no MoE; "
                          "keep at least one.")
    decoder = family.decoder_layers(model)
    for i in indices:
        setattr(decoder[i], family.block, DroppedMLP(pair=family.block_returns_pair))
        if family.shared is not None and not family.shared.mlp.startswith(f"{family.block}."):
            owner, _, name = family.shared.mlp.rpartition(".")
            setattr(decoder[i].get_submodule(owner) if owner else decoder[i], name, None)
    dropped = sorted(set(getattr(model.config, DROPPED_MLP_KEY, None) or []) | set(indices))
    setattr(model.config, DROPPED_MLP_KEY, dropped)
    if getattr(model.config, TOP_K_KEY, None):  # the dropped layers' k no longer matters
        ks = {i: k for i, k in getattr(model.config, TOP_K_KEY).items() if int(i) not in dropped}
        setattr(model.config, TOP_K_KEY, ks)
        if len(set(ks.values())) <= 1:
            delattr(model.config, TOP_K_KEY)
            if ks:
                setattr(model.config, family.top_k_key, next(iter(ks.values())))
    sync_expert_counts(model)


def skeleton(config, **build) -> nn.Module:
    """The model a saved config describes, on ``meta``: the family's structure
    (`moekit.arch.skeleton.model_from_config`, which takes ``build``) with moekit's
    recorded per-layer edits applied (`restore_moekit_layout`)."""
    from moekit.arch.skeleton import model_from_config

    model = model_from_config(config, **build)
    model.tie_weights()  # a head tied to the embeddings is one tensor, as in the loaded model
    restore_moekit_layout(model)
    return model


def restore_moekit_layout(model: nn.Module) -> None:
    """Give a model built from a config the per-layer edits moekit's format records (expert
    counts, top-k per layer, dropped MoE sublayers, factored experts), so its shapes and
    routing are the saved ones."""
    from moekit.arch.factored import restore_factored

    per_layer = {int(i): n for i, n in (getattr(model.config, PER_LAYER_KEY, None) or {}).items()}
    if per_layer:
        keep_experts(model, {i: list(range(n)) for i, n in per_layer.items()})
    dropped = getattr(model.config, DROPPED_MLP_KEY, None) or []
    if dropped:
        drop_mlp(model, dropped)
    top_k = getattr(model.config, TOP_K_KEY, None) or {}
    if top_k:
        set_top_k(model, {int(i): int(k) for i, k in top_k.items()})
    restore_factored(model)


def drop_blocks(model: nn.Module, indices: Sequence[int]) -> None:
    """Remove whole decoder layers: the others are renumbered (their attention's cache
    index too) and the config says the new depth, with every per-layer setting
    (``layer_types``, ``mlp_only_layers``, dense-first-layer counts…) renumbered by
    `moekit.arch.renumber.renumbered_config`, so the result is a standard model of its
    family with fewer layers.

    Raises:
        MoekitError: before anything changes, for indices out of range, dropping every
            layer or every MoE layer, or a pattern the family's config cannot express.
    """
    from moekit.arch.renumber import renumbered_config

    family = find_family(model)
    decoder = family.decoder_layers(model)
    kept = [i for i in range(len(decoder)) if i not in {int(j) for j in indices}]
    config = renumbered_config(model.config, kept)  # checks everything first
    remaining = [decoder[i] for i in kept]
    for new, layer in enumerate(remaining):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    parent_path, _, name = family.layers.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, nn.ModuleList(remaining))
    for key, value in config.to_dict().items():
        if key in ("transformers_version",):
            continue
        if getattr(model.config, key, None) != value:
            setattr(model.config, key, value)
    for key in (TOP_K_KEY, PER_LAYER_KEY, DROPPED_MLP_KEY):
        per_layer = getattr(config, key, None)
        if per_layer:
            setattr(model.config, key, per_layer)
        elif hasattr(model.config, key):
            delattr(model.config, key)
    sync_expert_counts(model)
    ks = getattr(model.config, TOP_K_KEY, None)
    if ks and len(set(ks.values())) == 1:  # the layers left share one k: a standard config says it
        delattr(model.config, TOP_K_KEY)
        setattr(model.config, family.top_k_key, next(iter(ks.values())))
