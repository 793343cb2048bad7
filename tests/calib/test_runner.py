"""The layer-streamed runner reproduces a plain full-model forward for every family,
from memory and from a checkpoint read one layer at a time."""

from __future__ import annotations

import torch

import moekit
from moekit.arch.adapters import find_family
from moekit.calib.activations import ActivationBudget
from moekit.calib.runner import LayerStreamer
from moekit.io.layered import LayeredModel

IDS = torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(0))


def _plain_last_hidden(model) -> torch.Tensor:
    decoder = find_family(model).decoder_layers(model)
    got = {}
    hook = decoder[-1].register_forward_hook(
        lambda _m, _a, out: got.setdefault("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = model(IDS).logits
    hook.remove()
    return got["h"], logits


def _stream(lent, batch_size, budget=None):
    streamer = LayerStreamer(lent, IDS, batch_size=batch_size, budget=budget)
    hidden = streamer.capture()
    for index, layer in streamer.layers():
        streamer.forward(index, layer, hidden)
    logits = torch.cat([streamer.logits(hidden, b) for b in range(len(hidden))])
    return hidden.cat(), logits


def test_streamed_hidden_and_logits_equal_plain_forward(model):
    want_hidden, want_logits = _plain_last_hidden(model)
    for batch_size in (2, 5):
        hidden, logits = _stream(LayeredModel.in_memory(model), batch_size)
        assert (hidden - want_hidden).abs().max().item() <= 1e-4
        assert (logits - want_logits).abs().max().item() <= 1e-4


def test_streaming_from_a_checkpoint_equals_streaming_from_memory(model, tmp_path):
    """Bitwise: the layers read from disk hold exactly the weights of the model in memory,
    and spilling hidden states to files changes nothing either."""
    moekit.save(model, tmp_path / "m")
    in_memory = _stream(LayeredModel.in_memory(model), 2)
    lent = LayeredModel.from_checkpoint(tmp_path / "m")
    from_disk = _stream(lent, 2, budget=ActivationBudget(0, tmp_path / "spill"))
    assert torch.equal(in_memory[0], from_disk[0]) and torch.equal(in_memory[1], from_disk[1])
    assert all(p.device.type == "meta" for p in lent.layers.parameters())  # every layer released


def test_layers_run_in_depth_order_once_each(model):
    streamer = LayerStreamer(LayeredModel.in_memory(model), IDS, batch_size=2)
    hidden = streamer.capture()
    seen = []
    for index, layer in streamer.layers():
        streamer.forward(index, layer, hidden, on_batch=lambda b, i=index: seen.append((i, b)))
    n = len(find_family(model).decoder_layers(model))
    assert seen == [(layer, batch) for layer in range(n) for batch in range(3)]
