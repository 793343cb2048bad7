"""Push batches of rows through a model one decoder layer at a time.

The way sequential calibration works in GPTQ-style tools: first capture what enters the
decoder stack for every batch, then push every batch through layer 0, then layer 1, and
so on. Only one layer's weights are needed at a time (`moekit.io.layered.LayeredModel`
lends them), and only the hidden states between two layers are alive
(`moekit.calib.activations`), so the memory a pass needs is set by one layer, not by the
model. Calibration, compression and evaluation all run on this one loop.

Capturing the inputs is done generically: every decoder layer is temporarily replaced by
a `_Recorder` that stores the (args, kwargs) the model's own forward passes it and
returns the hidden state unchanged. The model's forward thus computes, for each layer,
exactly the attention mask (full, sliding, chunked, linear-attention), position
embeddings and extra arguments it would have given it, at the cost of embeddings only.
The final norm and head run the same way (`logits`): the model's own forward, with the
first layer replaced by the stored final hidden state and the others by identities.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moekit.calib.activations import ActivationBudget, HiddenStates
from moekit.io.layered import LayeredModel

if TYPE_CHECKING:
    from moekit.arch.layer import MoELayer


@dataclass
class LayerCall:
    """What the model passed a decoder layer for one batch (everything but the hidden state)."""

    args: tuple
    kwargs: dict[str, Any]


class _Stand(nn.Module):
    """Stands in for a decoder layer: records its call (``calls``) and returns the hidden
    state unchanged, or returns ``replace`` instead of it."""

    def __init__(self, layer: nn.Module, calls: list[LayerCall] | None, replace: torch.Tensor | None = None) -> None:
        super().__init__()
        self.wrapped = [layer]  # a list, so the layer is not registered as a child
        self.calls = calls
        self.replace = replace

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped[0], name)  # e.g. layer_type, attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.calls is not None:
            self.calls.append(LayerCall(args=args, kwargs=kwargs))
        return self.replace if self.replace is not None else hidden_states


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
    """Batches of rows pushed through a `LayeredModel`'s decoder layers in depth order.

    Usage::

        streamer = LayerStreamer(lent, input_ids, batch_size=8)
        hidden = streamer.capture()                  # what enters layer 0, per batch
        for index, layer in streamer.layers():       # lent one at a time, released after
            streamer.forward(index, layer, hidden)   # hidden now leaves layer `index`
        logits = streamer.logits(hidden, b)          # the model's head on batch b

    Args:
        lent: the model, lending one decoder layer at a time.
        input_ids: [N, S] token ids, cut into batches of ``batch_size`` rows; or a list of
            batches [B, S_b] already cut (rows of different widths, padded per batch).
        batch_size: rows per forward of one layer.
        attention_mask: like ``input_ids`` (1 = a real token), for padded rows.
        budget: where hidden states live (memory, or files above a size).
        shard: in a torch.distributed run, keep only this rank's share of the batches
            (`moekit.distributed.shard`); ``world`` is then the group, ``mine`` the
            indices of its batches, ``first_token`` the global position of its first token.
    """

    def __init__(
        self,
        lent: LayeredModel,
        input_ids: torch.Tensor | list[torch.Tensor],
        *,
        batch_size: int = 8,
        attention_mask: torch.Tensor | list[torch.Tensor] | None = None,
        budget: ActivationBudget | None = None,
        shard: bool = False,
    ) -> None:
        self.lent = lent
        self.device = lent.device
        self.batches = list(input_ids.split(batch_size)) if isinstance(input_ids, torch.Tensor) else list(input_ids)
        self.masks = None
        if attention_mask is not None:
            self.masks = list(attention_mask.split(batch_size)) if isinstance(attention_mask, torch.Tensor) \
                else list(attention_mask)
        self.budget = budget or ActivationBudget()
        self.calls: list[list[LayerCall]] = []  # [batch][layer], on the CPU
        self.world, self.first_token, self.mine = None, 0, range(len(self.batches))
        if shard:
            from moekit.distributed import current, my_batches

            self.world = current()
            self.mine = my_batches(len(self.batches), self.world)  # indices of this rank's batches among all
            self.first_token = sum(b.numel() for b in self.batches[: self.mine.start])
            self.batches = self.batches[self.mine.start: self.mine.stop]
            self.masks = self.masks[self.mine.start: self.mine.stop] if self.masks is not None else None

    def _base_inputs(self, b: int) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.batches[b].to(self.device)}
        if self.masks is not None:
            inputs["attention_mask"] = self.masks[b].to(self.device)
        return inputs

    @torch.no_grad()
    def capture(self, name: str = "hidden") -> HiddenStates:
        """One pass of the base model per batch with stand-ins as layers: records every
        layer's call and returns the states entering layer 0."""
        decoder, originals = self.lent.layers, list(self.lent.layers)
        first: list[torch.Tensor] = []
        self.calls = []
        for b in range(len(self.batches)):
            calls: list[LayerCall] = []
            for i, layer in enumerate(originals):
                decoder[i] = _Stand(layer, calls)
            hook = decoder[0].register_forward_pre_hook(lambda _m, args: first.append(args[0].cpu()))
            try:
                self.lent.model.base_model(**self._base_inputs(b), use_cache=False)
            finally:
                hook.remove()
                for i, layer in enumerate(originals):
                    decoder[i] = layer
            memo: dict[int, torch.Tensor] = {}
            self.calls.append([LayerCall(_to(c.args, torch.device("cpu"), memo),
                                         _to(c.kwargs, torch.device("cpu"), memo)) for c in calls])
        return self.budget.place(first, name)

    def layers(self, start: int = 0) -> Iterator[tuple[int, nn.Module]]:
        """(index, decoder layer) from ``start`` on, each lent while the caller works on it
        and released before the next is lent."""
        for index in range(start, len(self.lent)):
            layer = self.lent.layer(index)
            try:
                yield index, layer
            finally:
                self.lent.release(index)

    def routed_layers(self, hidden: HiddenStates, advance: Callable[[int, str], None]
                      ) -> Iterator[tuple[int, nn.Module, MoELayer, Callable[[int], None]]]:
        """(index, decoder layer, its MoE view, on_batch) for each MoE layer in turn, lent;
        the dense layers in between are run on ``hidden`` here. ``advance(n, status)`` is a
        progress callback; the caller runs each MoE layer itself (its observers differ)."""
        from moekit.arch.discover import view_layer

        for index, layer in self.layers():
            view = view_layer(self.lent.model, index)
            status = f"layer {index + 1}/{len(self.lent)}"

            def on_batch(b: int, status: str = status) -> None:
                advance(1, status)

            if view is None:
                self.forward(index, layer, hidden, on_batch=on_batch)
                continue
            yield index, layer, view, on_batch

    @torch.no_grad()
    def forward(
        self,
        index: int,
        layer: nn.Module,
        hidden: HiddenStates,
        *,
        observe: AbstractContextManager | None = None,
        on_batch: Callable[[int], None] | None = None,
        store: bool = True,
        batches: int | None = None,
    ) -> None:
        """Replace every batch of ``hidden`` by ``layer``'s output on it. ``observe`` (e.g.
        forward hooks) stays open while the layer runs; ``on_batch(b)`` follows each batch.
        ``store=False`` runs the layer for what ``observe`` sees and leaves ``hidden`` as it
        was (a step that reads a layer's inputs runs it several times before it advances);
        ``batches`` runs only the first so many."""
        with observe if observe is not None else nullcontext():
            for b in range(len(hidden) if batches is None else min(batches, len(hidden))):
                call = self.calls[b][index]
                out = layer(hidden[b].to(self.device), *_to(call.args, self.device), **_to(call.kwargs, self.device))
                if store:
                    hidden[b] = out[0] if isinstance(out, tuple) else out
                if on_batch is not None:
                    on_batch(b)

    @torch.no_grad()
    def logits(self, hidden: HiddenStates, b: int) -> torch.Tensor:
        """[B, S, V]: the model's output for batch ``b`` whose last layer left ``hidden[b]``:
        its own forward (final norm, head, any logit scaling) with the stack replaced."""
        decoder, originals = self.lent.layers, list(self.lent.layers)
        decoder[0] = _Stand(originals[0], None, replace=hidden[b].to(self.device))
        for i in range(1, len(originals)):
            decoder[i] = _Stand(originals[i], None)
        try:
            return self.lent.model(**self._base_inputs(b), use_cache=False).logits
        finally:
            for i, layer in enumerate(originals):
                decoder[i] = layer


@dataclass
class LayerInputs:
    """The calibration inputs of one decoder layer, for a step that runs the layer itself
    (GPTQ quantizes a layer's sub-modules in turn, each from inputs that went through the
    already quantized ones, so it runs the layer once per stage).

    Attributes:
        layer: the decoder layer, lent.
        prefix: its parameters' names in the model (``model.layers.3.``).
    """

    streamer: LayerStreamer
    index: int
    layer: nn.Module
    prefix: str
    hidden: HiddenStates
    on_batch: Callable[[int], None] | None = None
    reference_logits: torch.Tensor | None = None  # [N, E], see `Step.reads_reference`

    def run(self, observe: AbstractContextManager, *, first_batch_only: bool = False) -> None:
        """Run the layer on every batch (or the first) while ``observe`` is open; the
        stream of hidden states is left as it was."""
        self.streamer.forward(self.index, self.layer, self.hidden, observe=observe, on_batch=self.on_batch,
                              store=False, batches=1 if first_batch_only else None)
