"""The canonical MoE layer: router, routed experts, shared experts, and a reference forward.

`MoELayer.forward` recomputes a Hugging Face MoE block's output from the canonical
tensors alone. It is deliberately plain (a loop over experts) because it is the
specification the tests hold every family's view to, and the building block of
reconstruction objectives later; fast kernels live in `moekit.runtime`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moekit.arch.experts import Experts
from moekit.arch.routing import RoutingSpec, route, router_logits, scores_from_logits

_ACTIVATION_ATTRS = ("act_fn", "activation_fn", "activation")


def module_activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation an HF MLP module applies, whatever the family named the attribute."""
    for name in _ACTIVATION_ATTRS:
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    raise AttributeError(f"{type(module).__name__} has none of {_ACTIVATION_ATTRS}")


class Router:
    """Canonical view of a router: ``weight [E, H]``, ``bias [E]`` (optional),
    ``correction_bias [E]`` (optional, selection only) and the routing semantics."""

    def __init__(self, module: nn.Module, spec: RoutingSpec, correction_bias_path: str | None) -> None:
        self.module = module
        self.spec = spec
        self.correction_bias_path = correction_bias_path

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def correction_bias(self) -> torch.Tensor | None:
        if self.correction_bias_path is None:
            return None
        owner_path, _, name = self.correction_bias_path.rpartition(".")
        owner = self.module.get_submodule(owner_path) if owner_path else self.module
        return getattr(owner, name).view(-1)

    @property
    def top_k(self) -> int:
        return self.spec.top_k

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, E]."""
        weight = self.weight
        bias = self.bias
        return router_logits(hidden.to(weight.dtype), weight, bias)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """p_j(x) [T, E]; see `moekit.arch.routing.scores_from_logits`."""
        return scores_from_logits(logits, self.spec)

    def route(
        self, logits: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_index [T, k], top_k_weights [T, k]); ``allowed`` [E] bool restricts the
        choice as if the other experts were removed."""
        return route(logits, self.spec, self.correction_bias, allowed)


@dataclass
class SharedExperts:
    """Always-on experts of a layer, canonical views: ``gate [Is, H]``, ``up [Is, H]``,
    ``down [H, Is]``, their optional biases, and the optional scalar sigmoid gate
    ``gate_weight [1, H]`` (Qwen2-MoE, Qwen3-Next).

    ``fused`` modules keep gate and up in one ``input_linear [2Is, H]`` (Granite)."""

    module: nn.Module
    fused: bool
    gate_module: nn.Module | None = None

    def _in_linear_half(self, which: int, attr: str) -> torch.Tensor | None:
        if self.fused:
            tensor = getattr(self.module.input_linear, attr)
            return None if tensor is None else tensor.chunk(2, dim=0)[which]
        linear = self.module.gate_proj if which == 0 else self.module.up_proj
        return getattr(linear, attr)

    @property
    def _down_linear(self) -> nn.Linear:
        return self.module.output_linear if self.fused else self.module.down_proj

    @property
    def gate(self) -> torch.Tensor:
        return self._in_linear_half(0, "weight")

    @property
    def up(self) -> torch.Tensor:
        return self._in_linear_half(1, "weight")

    @property
    def down(self) -> torch.Tensor:
        return self._down_linear.weight

    @property
    def gate_bias(self) -> torch.Tensor | None:
        return self._in_linear_half(0, "bias")

    @property
    def up_bias(self) -> torch.Tensor | None:
        return self._in_linear_half(1, "bias")

    @property
    def down_bias(self) -> torch.Tensor | None:
        return self._down_linear.bias

    @property
    def gate_weight(self) -> torch.Tensor | None:
        return None if self.gate_module is None else self.gate_module.weight

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[1]

    def parameters(self) -> list[nn.Parameter]:
        params = list(self.module.parameters())
        if self.gate_module is not None:
            params += list(self.gate_module.parameters())
        return params

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H]."""
        linear = torch.nn.functional.linear
        gate = linear(hidden, self.gate, self.gate_bias)
        up = linear(hidden, self.up, self.up_bias)
        out = linear(module_activation(self.module)(gate) * up, self.down, self.down_bias)
        if self.gate_weight is not None:
            out = torch.sigmoid(linear(hidden, self.gate_weight)) * out
        return out


@dataclass
class MoELayer:
    """One decoder layer's mixture of experts, in moekit's canonical form.

    Attributes:
        index: the decoder layer's index in the model.
        path: module path of the MoE block (e.g. ``model.layers.3.mlp``).
        family: name of the adapter that recognised the model.
        block: the Hugging Face MoE block module.
        router, experts, shared: canonical views (``shared`` is None when absent).
    """

    index: int
    path: str
    family: str
    block: nn.Module
    router: Router
    experts: Experts
    shared: SharedExperts | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def routed_forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Σ_j g_j(x) f_j(x) over each token's chosen experts. hidden [T, H] -> [T, H]."""
        out = torch.zeros_like(hidden)
        weight_on_input = self.router.spec.weight_on_input
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            weight = top_k_weights[token, slot, None].to(hidden.dtype)
            if weight_on_input:
                contribution = self.experts.expert_forward(expert, hidden[token] * weight)
            else:
                contribution = self.experts.expert_forward(expert, hidden[token]) * weight
            out.index_add_(0, token, contribution)
        return out

    def forward(
        self, hidden: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference forward from canonical tensors only.

        Args:
            hidden: [T, H], the input of the MoE block (after the layer's norm).
            allowed: [E] bool; compute the block as if only these experts were kept.

        Returns:
            output [T, H] (shared experts included), router_logits [T, E],
            top_k_index [T, k], top_k_weights [T, k].
        """
        logits = self.router.logits(hidden)
        top_k_index, top_k_weights = self.router.route(logits, allowed)
        out = self.routed_forward(hidden, top_k_index, top_k_weights)
        if self.shared is not None:
            out = out + self.shared.forward(hidden)
        return out, logits, top_k_index, top_k_weights

    __call__ = forward


@contextmanager
def watching(module: nn.Module, see: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """While open, ``see(x)`` gets the first input of every call of ``module`` (its hidden
    states: what observers, Hessians and routers are computed from)."""
    handle = module.register_forward_pre_hook(lambda _m, args: see(args[0]))
    try:
        yield
    finally:
        handle.remove()
