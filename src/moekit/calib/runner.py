"""Run a model one decoder layer at a time over all calibration samples.

The way sequential calibration works in GPTQ-style tools: first capture what enters the
decoder stack for every sample, then push all samples through layer 0, then layer 1, and
so on. Only one layer's weights need to be on the compute device and only one layer's
activations are alive, so a model larger than accelerator memory can be calibrated.

Capturing the inputs is done generically: every decoder layer is temporarily replaced by
a `_Recorder` that stores the (args, kwargs) the model's own forward passes it and
returns the hidden state unchanged. The model's forward thus computes, for each layer,
exactly the attention mask (full, sliding, chunked, linear-attention), position
embeddings and extra arguments it would have given it, at the cost of embeddings only.

Peak memory: the hidden states of all samples, N·S·H·4 bytes (fp32, held on
``offload_device``), plus one layer's weights and one batch's activations on ``device``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moekit.arch.adapters import find_family


@dataclass
class LayerCall:
    """What the model passed a decoder layer for one batch (everything but the hidden state)."""

    args: tuple
    kwargs: dict[str, Any]


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call, returns the hidden state."""

    def __init__(self, layer: nn.Module, calls: list[LayerCall]) -> None:
        super().__init__()
        self.wrapped = [layer]  # a list, so the layer is not registered as a child
        self.calls = calls

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped[0], name)  # e.g. layer_type, attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append(LayerCall(args=args, kwargs=kwargs))
        return hidden_states


def _to(value: Any, device: torch.device, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """Move tensors inside nested containers; a tensor shared by several layers' calls
    (masks, position embeddings) is moved once (``memo``), not once per layer."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, tuple):
        return tuple(_to(v, device, memo) for v in value)
    if isinstance(value, list):
        return [_to(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


class LayerStreamer:
    """Streams calibration batches through a model's decoder layers in depth order.

    Usage::

        streamer = LayerStreamer(model, input_ids, batch_size=8)
        streamer.run(observe=lambda index, layer: hooks_on(layer))   # a context manager
        final = streamer.final_hidden()                              # [N, S, H]

    Args:
        model: an HF causal LM of a supported family.
        input_ids: [N, S] token ids.
        batch_size: samples per forward of one layer.
        device: where each layer computes (default: where the model is).
        offload_device: where hidden states and idle layers wait (default: CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        *,
        batch_size: int = 8,
        device: torch.device | str | None = None,
        offload_device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.decoder = find_family(model).decoder_layers(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.offload = torch.device(offload_device)
        self.batches = list(input_ids.split(batch_size))
        self.calls: list[list[LayerCall]] = []  # [batch][layer]
        self.hidden: list[torch.Tensor] = []  # per batch, [B, S, H] on the offload device
        self._capture()

    @property
    def num_tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    @torch.no_grad()
    def _capture(self) -> None:
        """One pass of the base model (no LM head) per batch with recorders as layers."""
        originals = list(self.decoder)
        for batch in self.batches:
            calls: list[LayerCall] = []
            first_input: list[torch.Tensor] = []
            for i, layer in enumerate(originals):
                self.decoder[i] = _Recorder(layer, calls)
            hook = self.decoder[0].register_forward_pre_hook(lambda _m, args: first_input.append(args[0]))
            try:
                self.model.base_model(input_ids=batch.to(self.device), use_cache=False)
            finally:
                hook.remove()
                for i, layer in enumerate(originals):
                    self.decoder[i] = layer
            memo: dict[int, torch.Tensor] = {}
            self.calls.append(
                [LayerCall(_to(c.args, self.offload, memo), _to(c.kwargs, self.offload, memo)) for c in calls]
            )
            self.hidden.append(first_input[0].to(self.offload))

    @torch.no_grad()
    def run(
        self,
        observe: Callable[[int, nn.Module], AbstractContextManager] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        """Run every decoder layer over all batches, in depth order.

        Args:
            observe: called with (layer index, layer) before the layer runs; the context
                manager it returns (e.g. one holding forward hooks) stays open while the
                layer processes every batch.
            on_batch: called with (layer index, batch index) after each batch (progress).
        """
        for index, layer in enumerate(self.decoder):
            layer.to(self.device)
            with observe(index, layer) if observe is not None else nullcontext():
                for b, hidden in enumerate(self.hidden):
                    call = self.calls[b][index]
                    out = layer(hidden.to(self.device), *_to(call.args, self.device), **_to(call.kwargs, self.device))
                    out = out[0] if isinstance(out, tuple) else out
                    self.hidden[b] = out.to(self.offload)
                    if on_batch is not None:
                        on_batch(index, b)
            if self.device != self.offload:
                layer.to(self.offload)

    def final_hidden(self) -> torch.Tensor:
        """[N, S, H]: the output of the last decoder layer for every sample."""
        return torch.cat(self.hidden)
