"""The layer-streamed runner reproduces a plain full-model forward for every family."""

from __future__ import annotations

import torch

from moekit.arch.adapters import find_family
from moekit.calib.runner import LayerStreamer

IDS = torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(0))


def test_streamed_hidden_equals_plain_forward(model):
    decoder = find_family(model).decoder_layers(model)
    got = {}
    hook = decoder[-1].register_forward_hook(
        lambda _m, _a, out: got.setdefault("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(IDS)
    hook.remove()
    for batch_size in (2, 5):
        streamer = LayerStreamer(model, IDS, batch_size=batch_size)
        streamer.run()
        assert (streamer.final_hidden() - got["h"]).abs().max().item() <= 1e-4


def test_layers_run_in_depth_order_once_each(model):
    streamer = LayerStreamer(model, IDS, batch_size=2)
    seen = []
    streamer.run(on_batch=lambda layer, batch: seen.append((layer, batch)))
    n = len(find_family(model).decoder_layers(model))
    assert seen == [(layer, batch) for layer in range(n) for batch in range(3)]
