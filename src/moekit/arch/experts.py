"""Routed experts in one canonical orientation, as views into the model's own tensors.

transformers v5 fuses a layer's experts into two 3-D parameters. Most families store
``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj [E, H, I]``;
GPT-OSS and Llama-4 store them transposed (``[E, H, 2I]``, ``[E, I, H]``), and GPT-OSS
interleaves gate and up columns and adds biases. `Experts` hides all of that: its
``gate_up``/``gate``/``up``/``down`` are views (never copies) in the canonical
``[E, out, in]`` orientation, so writing through them edits the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Layout = Literal["concatenated", "interleaved"]


@dataclass(frozen=True)
class ExpertsSpec:
    """How a family stores its fused experts.

    Attributes:
        transposed: tensors are stored ``[E, in, out]`` (GPT-OSS, Llama-4).
        layout: gate/up rows of ``gate_up`` concatenated or interleaved (GPT-OSS).
        clamped_swiglu: GPT-OSS's activation ``(clamp(up)+1)·g·σ(α·g)``, g = clamp(gate).
    """

    transposed: bool = False
    layout: Layout = "concatenated"
    clamped_swiglu: bool = False


class Experts:
    """Canonical view of one layer's routed experts.

    Shapes: ``gate_up [E, 2I, H]``, ``gate [E, I, H]``, ``up [E, I, H]``,
    ``down [E, H, I]``, ``gate_up_bias [E, 2I]``, ``down_bias [E, H]`` (biases optional).
    Properties are recomputed from the module on each access, so they stay valid after
    `moekit.arch.edit` replaces the module's parameters.
    """

    def __init__(self, module: nn.Module, spec: ExpertsSpec) -> None:
        self.module = module
        self.spec = spec

    # -- views ---------------------------------------------------------------------
    def _oriented(self, name: str) -> torch.Tensor:
        tensor = getattr(self.module, name)
        return tensor.transpose(1, 2) if self.spec.transposed else tensor

    @property
    def gate_up(self) -> torch.Tensor:
        """[E, 2I, H], rows in storage order (see ``spec.layout``)."""
        return self._oriented("gate_up_proj")

    @property
    def down(self) -> torch.Tensor:
        """[E, H, I]."""
        return self._oriented("down_proj")

    @property
    def gate(self) -> torch.Tensor:
        """[E, I, H] gate rows, a strided view."""
        return self._half(self.gate_up, 0)

    @property
    def up(self) -> torch.Tensor:
        """[E, I, H] up rows, a strided view."""
        return self._half(self.gate_up, 1)

    @property
    def gate_up_bias(self) -> torch.Tensor | None:
        return getattr(self.module, "gate_up_proj_bias", None)

    @property
    def gate_bias(self) -> torch.Tensor | None:
        bias = self.gate_up_bias
        return None if bias is None else self._half(bias, 0)

    @property
    def up_bias(self) -> torch.Tensor | None:
        bias = self.gate_up_bias
        return None if bias is None else self._half(bias, 1)

    @property
    def down_bias(self) -> torch.Tensor | None:
        return getattr(self.module, "down_proj_bias", None)

    def _half(self, tensor: torch.Tensor, which: int) -> torch.Tensor:
        """Gate (0) or up (1) rows of a [E, 2I, ...] tensor."""
        if self.spec.layout == "interleaved":
            return tensor[:, which::2]
        size = tensor.shape[1] // 2
        return tensor[:, which * size : (which + 1) * size]

    # -- sizes ---------------------------------------------------------------------
    # (factored experts, `moekit.arch.factored`, compute their products on access: their
    # sizes are read from the module instead)
    @property
    def num_experts(self) -> int:
        if getattr(self.module, "moekit_factored", False):
            return self.module.num_experts
        return self.gate_up.shape[0]

    @property
    def intermediate_size(self) -> int:
        if getattr(self.module, "moekit_factored", False):
            return self.module.intermediate_dim
        return self.down.shape[2]

    @property
    def hidden_size(self) -> int:
        if getattr(self.module, "moekit_factored", False):
            return self.module.hidden_dim
        return self.down.shape[1]

    # -- compute -------------------------------------------------------------------
    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.module.act_fn

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The gated activation of the intermediate neurons."""
        if self.spec.clamped_swiglu:
            limit, alpha = self.module.limit, self.module.alpha
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
            return (up + 1) * gate * torch.sigmoid(gate * alpha)
        return self.activation(gate) * up

    def intermediate(self, expert: int, x: torch.Tensor, gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """h_j(x): expert ``expert``'s activated intermediate neurons, x [N, H] -> [N, I];
        with ``gate_up`` [2I, H], computed with those weights instead of the expert's own."""
        gate_up = self.gate_up[expert] if gate_up is None else gate_up
        gate = x @ self._half(gate_up[None], 0)[0].T
        up = x @ self._half(gate_up[None], 1)[0].T
        if self.gate_up_bias is not None:
            gate = gate + self.gate_bias[expert]
            up = up + self.up_bias[expert]
        return self.glu(gate, up)

    def forward_with(self, expert: int, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """f_j(x) with expert ``expert``'s weights replaced by ``gate_up`` [2I, H] and ``down``
        [H, I] (canonical orientation; biases kept): what a changed expert would output."""
        out = self.intermediate(expert, x, gate_up) @ down.T
        return out + self.down_bias[expert] if self.down_bias is not None else out

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """f_j(x): expert ``expert`` applied to x [N, H] -> [N, H], unweighted."""
        return self.forward_with(expert, x, self.gate_up[expert], self.down[expert])
