"""Finding the MoE layers of a model and building their canonical views."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moekit.arch.adapters import Family, find_family
from moekit.arch.experts import Experts
from moekit.arch.layer import MoELayer, Router, SharedExperts
from moekit.arch.layout import layer_top_k
from moekit.errors import UnsupportedModelError


@dataclass
class DecoderLayerInfo:
    """One decoder layer: routed (``moe`` set) or dense (``moe`` None, e.g. DeepSeek's
    ``first_k_dense_replace`` or Qwen's ``mlp_only_layers``)."""

    index: int
    moe: MoELayer | None

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


def decoder_layers(model: nn.Module) -> list[DecoderLayerInfo]:
    """Every decoder layer of ``model`` in depth order, routed or dense."""
    family = find_family(model)
    return [
        DecoderLayerInfo(index=i, moe=_view_layer(model, family, i, layer))
        for i, layer in enumerate(family.decoder_layers(model))
    ]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The canonical view of each routed-expert layer of ``model``, in depth order.

    Raises:
        UnsupportedModelError: the model is not of a supported family, or none of its
            layers has routed experts.
    """
    layers = [info.moe for info in decoder_layers(model) if info.moe is not None]
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no layer with routed experts; nothing for moekit to do."
        )
    return layers


def view_layer(model: nn.Module, index: int) -> MoELayer | None:
    """The canonical view of decoder layer ``index`` (None for a dense layer), without
    viewing the others: a streamed pass views each layer as it is lent."""
    family = find_family(model)
    return _view_layer(model, family, index, family.decoder_layers(model)[index])


def family_of(model: nn.Module) -> Family:
    return find_family(model)


def _view_layer(model: nn.Module, family: Family, index: int, layer: nn.Module) -> MoELayer | None:
    block = getattr(layer, family.block, None)
    if not family.is_moe_block(block):
        return None
    config = model.config
    experts = Experts(getattr(block, family.experts), family.experts_spec)
    top_k = int(getattr(config, family.top_k_key))
    own = layer_top_k(config, index)  # `moekit.arch.edit.set_top_k`
    if own is not None:
        top_k = own
    router = Router(
        getattr(block, family.router),
        family.routing.resolve(config, top_k),
        family.correction_bias,
    )
    shared = None
    if family.shared is not None:
        shared_module = _optional_submodule(layer, family.shared.mlp)
        if shared_module is not None:
            gate = _optional_submodule(layer, family.shared.gate) if family.shared.gate else None
            shared = SharedExperts(shared_module, fused=family.shared.fused, gate_module=gate)
    return MoELayer(
        index=index,
        path=f"{family.layers}.{index}.{family.block}",
        family=family.name,
        block=block,
        router=router,
        experts=experts,
        shared=shared,
    )


def _optional_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


__all__ = ["DecoderLayerInfo", "decoder_layers", "family_of", "moe_layers", "view_layer", "UnsupportedModelError"]


def decoder_stack(model: nn.Module):
    """(MoE family or None, path of the decoder-layer list). A dense model (the start of
    upcycling, a dense reference) has no MoE family; its layers are where transformers'
    decoder models keep them, ``<base model>.layers``."""
    try:
        family = find_family(model)
        return family, family.layers
    except UnsupportedModelError:
        prefix = getattr(model, "base_model_prefix", "")
        path = f"{prefix}.layers" if prefix else "layers"
        try:
            if isinstance(model.get_submodule(path), nn.ModuleList):
                return None, path
        except AttributeError:
            pass
        raise
