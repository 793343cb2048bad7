"""What a model family is, as data: where its MoE pieces live and how it routes.

A `Family` never contains code that computes anything; routing and expert math live in
`moekit.arch.routing` / `moekit.arch.experts`, written once. Values that depend on the
checkpoint's config are written as `Cfg("key")` and read when a model is viewed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from moekit.arch.experts import ExpertsSpec
from moekit.arch.routing import RoutingSpec


@dataclass(frozen=True)
class Cfg:
    """A value read from the model config: ``config.<key>``, or ``default`` if missing
    or None. With ``only_if=(key, value)`` the value is read only when
    ``config.<key> == value``, else ``default`` (DeepSeek-V2's ``topk_method``)."""

    key: str
    default: Any = None
    only_if: tuple[str, Any] | None = None

    def read(self, config: Any) -> Any:
        if self.only_if is not None and getattr(config, self.only_if[0], None) != self.only_if[1]:
            return self.default
        value = getattr(config, self.key, None)
        return self.default if value is None else value


@dataclass(frozen=True)
class Routing:
    """`RoutingSpec` fields, each a constant or a `Cfg`; ``top_k`` always comes from config."""

    scoring: Any = "softmax"
    topk_before_scoring: Any = False
    norm_topk_prob: Any = False
    norm_min: Any = 0.0
    routed_scaling_factor: Any = 1.0
    n_group: Any = 1
    topk_group: Any = 1
    group_score: Any = "max"
    jitter_eps: Any = 0.0
    weight_on_input: Any = False

    def resolve(self, config: Any, top_k: int) -> RoutingSpec:
        values = {
            f.name: (v.read(config) if isinstance(v, Cfg) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return RoutingSpec(top_k=top_k, **values)


@dataclass(frozen=True)
class Shared:
    """Where a layer's shared experts live, relative to the *decoder layer*.

    ``fused``: gate and up stacked in one ``input_linear`` (Granite).
    ``gate``: a ``Linear(H, 1)`` whose sigmoid scales the shared output.
    """

    mlp: str
    gate: str | None = None
    fused: bool = False


@dataclass(frozen=True)
class Family:
    """One Hugging Face MoE family.

    Attributes:
        name: moekit's name for it.
        model_types: ``config.model_type`` values it covers.
        num_experts_key: the config attribute holding E (aliases follow via attribute_map).
        layers: path from the model to the list of decoder layers.
        block: attribute of a decoder layer holding the MoE block (a dense MLP there
            means the layer is dense).
        router, experts: attributes of the block.
        correction_bias: path from the router to its selection-only bias, if any.
        shared: shared experts, if any.
        routing: router semantics.
        experts_spec: storage of the fused experts.
        top_k_key: the config attribute holding k.
        block_returns_pair: the block returns (output, router scores), which the family's
            decoder layer unpacks (what a removed sublayer must return too).
        eager_skips_sentinel: transformers' eager experts forward skips slots routed to
            expert E, its "no expert" sentinel (GPT-OSS's rejects them).
    """

    name: str
    model_types: tuple[str, ...]
    num_experts_key: str
    routing: Routing
    layers: str = "model.layers"
    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    correction_bias: str | None = None
    shared: Shared | None = None
    experts_spec: ExpertsSpec = field(default_factory=ExpertsSpec)
    top_k_key: str = "num_experts_per_tok"
    block_returns_pair: bool = False
    eager_skips_sentinel: bool = True

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def is_moe_block(self, block: nn.Module | None) -> bool:
        """A block is routed when it has both a router and fused experts (or experts the
        `decompose` step factored, `moekit.arch.factored`)."""
        if block is None:
            return False
        experts = getattr(block, self.experts, None)
        if getattr(experts, "moekit_factored", False):
            return hasattr(block, self.router)
        return hasattr(block, self.router) and isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter)

    def supports(self, model: nn.Module, explain: bool = False) -> bool | tuple[bool, str]:
        """Whether this family can view ``model``; with ``explain``, also say why not."""
        ok, why = self._check(model)
        return (ok, why) if explain else ok

    def _check(self, model: nn.Module) -> tuple[bool, str]:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in self.model_types:
            return False, f"model_type {model_type!r} is not one of {list(self.model_types)}"
        try:
            layers = self.decoder_layers(model)
        except AttributeError:
            return False, f"{type(model).__name__} has no decoder layers at '{self.layers}'"
        if not any(self.is_moe_block(getattr(layer, self.block, None)) for layer in layers):
            return False, (
                f"no decoder layer of {type(model).__name__} has a routed-expert block at "
                f"'{self.block}' with '{self.router}' and fused '{self.experts}.gate_up_proj'"
            )
        return True, f"{type(model).__name__} is a {self.name} model"
