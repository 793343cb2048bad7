"""Capturing what each router decided during a forward pass, with forward hooks.

The hooks sit on the router modules moekit's canonical view finds (`moekit.moe_layers`),
so they work for every family without HF's ``output_router_logits`` flag. Captured
logits stay in the autograd graph: router losses computed from them put their gradient
on the router weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.train.config import routed_layers
from moekit.arch.layer import MoELayer


@dataclass
class RoutingRecord:
    """One router call: ``logits`` [T, E] (with grad), ``top_k_index`` [T, k]."""

    layer: int
    logits: torch.Tensor
    top_k_index: torch.Tensor
    scoring: str


class RouterCapture:
    """Context manager recording every router call of ``model``.

    Usage::

        with RouterCapture(model) as cap:
            out = model(input_ids)
        for rec in cap.records: ...
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[MoELayer] = routed_layers(model)
        self.records: list[RoutingRecord] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> RouterCapture:
        for layer in self.layers:
            self._handles.append(layer.router.module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.records.clear()

    def _hook(self, layer: MoELayer):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, tuple) and len(output) == 3:
                # HF v5 routers return (router_logits, top_k_weights, top_k_index).
                logits, index = output[0], output[2]
            else:
                logits = output[0] if isinstance(output, tuple) else output
                index = layer.router.route(logits.detach())[0]
            self.records.append(
                RoutingRecord(layer.index, logits, index.detach(), layer.router.spec.scoring)
            )

        return hook
