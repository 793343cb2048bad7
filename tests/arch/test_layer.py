"""The reference forward, computed from canonical tensors only, equals each HF MoE block."""

from __future__ import annotations

import pytest
import torch

import moekit


def _block_io(model, input_ids):
    """Inputs and outputs of every MoE block (and of shared MLPs that sit beside the block)
    during a plain HF forward of the whole model."""
    captured = {}
    hooks = []
    layers = moekit.moe_layers(model)
    for layer in layers:
        def hook(module, args, output, index=layer.index):
            out = output[0] if isinstance(output, tuple) else output
            captured[index] = [args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1])]
        hooks.append(layer.block.register_forward_hook(hook))
        shared = layer.shared
        if shared is not None and not any(shared.module is m for m in layer.block.modules()):
            def shared_hook(module, args, output, index=layer.index):
                captured[index][1] = captured[index][1] + output.reshape(-1, output.shape[-1])
            hooks.append(shared.module.register_forward_hook(shared_hook))
    with torch.no_grad():
        model(input_ids)
    for h in hooks:
        h.remove()
    return layers, captured


def test_reference_forward_equals_hf_block(model, input_ids):
    layers, captured = _block_io(model, input_ids)
    assert captured.keys() == {layer.index for layer in layers}
    for layer in layers:
        hidden, expected = captured[layer.index]
        with torch.no_grad():
            out, logits, top_k_index, top_k_weights = layer.forward(hidden)
        assert out.shape == expected.shape
        assert (out - expected).abs().max().item() <= 1e-5, f"layer {layer.index}"
        assert logits.shape == (hidden.shape[0], layer.num_experts)
        assert top_k_index.shape == top_k_weights.shape == (hidden.shape[0], layer.top_k)


def test_reference_forward_uses_only_the_view(model, input_ids):
    """Changing a routed expert through the canonical view changes the HF block the same way."""
    layers, _ = _block_io(model, input_ids)
    layer = layers[-1]
    with torch.no_grad():
        layer.experts.gate[:] *= 1.5
        layer.experts.down[:] *= -0.5
    layers, captured = _block_io(model, input_ids)
    hidden, expected = captured[layer.index]
    with torch.no_grad():
        out = layers[-1].forward(hidden)[0]
    assert (out - expected).abs().max().item() <= 1e-5


def test_views_share_storage(model):
    """gate/up/down are views of the model's own parameters, not copies."""
    layer = moekit.moe_layers(model)[0]
    module = layer.experts.module
    for view, param in ((layer.experts.gate, module.gate_up_proj), (layer.experts.down, module.down_proj)):
        assert view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    assert layer.experts.gate.shape == layer.experts.up.shape == (
        layer.num_experts, layer.experts.intermediate_size, layer.experts.hidden_size
    )
    assert layer.experts.down.shape == (layer.num_experts, layer.experts.hidden_size, layer.experts.intermediate_size)
    assert layer.router.weight.shape == (layer.num_experts, layer.experts.hidden_size)


@pytest.mark.parametrize("family", ["gpt_oss"])
def test_interleaved_gate_up_split(model):
    """GPT-OSS stores gate and up interleaved along the last axis of [E, H, 2I]."""
    layer = moekit.moe_layers(model)[0]
    raw = layer.experts.module.gate_up_proj  # [E, H, 2I]
    assert torch.equal(layer.experts.gate, raw[:, :, 0::2].transpose(1, 2))
    assert torch.equal(layer.experts.up, raw[:, :, 1::2].transpose(1, 2))
