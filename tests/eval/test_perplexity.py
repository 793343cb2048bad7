"""Perplexity and accuracy equal a hand computation; routing statistics are right."""

from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.eval.perplexity import evaluate, windows
from moekit.zoo.tiny import tiny_model

STREAM = torch.randint(3, 128, (45,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("length, context, stride", [(45, 16, 8), (45, 16, 15), (10, 16, 4), (33, 7, 3), (2, 4, 1)])
def test_windows_score_every_token_once(length, context, stride):
    scored = []
    for begin, end, first in windows(length, context, stride):
        assert end - begin <= context and begin < first
        scored += range(first, end)
    assert scored == list(range(1, length))


def _dense_qwen3():
    """A tiny dense Qwen3, the family of the dense reference (no MoE view, no routing)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from moekit.zoo.tiny import randomize_

    config = Qwen3Config(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=256)
    return randomize_(AutoModelForCausalLM.from_config(config)).eval()


@pytest.mark.parametrize("make", [lambda: tiny_model("qwen3_moe"), _dense_qwen3], ids=["moe", "dense"])
def test_perplexity_equals_hand_computation(make):
    model = make()
    result = evaluate(model, STREAM, context_length=16, stride=8, batch_size=3, progress=False)
    nll, correct, n = 0.0, 0, 0
    for begin, end, first in windows(len(STREAM), 16, 8):
        with torch.no_grad():
            logits = model(STREAM[begin:end][None]).logits[0]
        for pos in range(first, end):  # predict token `pos` from the window up to pos - 1
            row = logits[pos - begin - 1]
            nll -= (row.log_softmax(-1)[STREAM[pos]]).item()
            correct += int(row.argmax().item() == STREAM[pos].item())
            n += 1
    assert result.tokens == n == len(STREAM) - 1
    assert math.isclose(result.nll, nll / n, rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(nll / n), rel_tol=1e-5)
    assert result.accuracy == correct / n


def test_routing_statistics_by_hand():
    model = tiny_model("mixtral")
    result = evaluate(model, STREAM, context_length=64, stride=32, progress=False)
    captured = {}
    layers = moekit.moe_layers(model)
    hooks = [l.block.register_forward_pre_hook(
        lambda _m, a, i=l.index: captured.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))) for l in layers]
    with torch.no_grad():
        model(STREAM[None])
    for h in hooks:
        h.remove()
    for layer, got in zip(layers, result.layers):
        x = captured[layer.index][:-1]  # the last position predicts nothing
        with torch.no_grad():
            probs = torch.softmax(x @ layer.router.weight.T, -1)
            index = probs.topk(2).indices
        entropy = -(probs * probs.log()).sum(-1).mean().item()
        load = torch.bincount(index.flatten(), minlength=8).float()
        assert math.isclose(got.entropy, entropy, rel_tol=1e-4)
        assert math.isclose(got.entropy_normalized, entropy / math.log(8), rel_tol=1e-4)
        assert math.isclose(got.load_imbalance, (load.max() / load.mean()).item(), rel_tol=1e-6)


def test_independent_rows_and_bad_settings():
    model = tiny_model("olmoe")
    rows = STREAM[:40].view(2, 20)
    result = evaluate(model, rows, context_length=20, stride=10, progress=False)
    assert result.tokens == 2 * 19
    with pytest.raises(MoekitError, match="beyond the model's 256 positions"):
        evaluate(model, STREAM, context_length=500, progress=False)
    with pytest.raises(MoekitError, match="stride"):
        evaluate(model, STREAM, context_length=16, stride=16, progress=False)
    with pytest.raises(MoekitError, match="too short"):
        evaluate(model, STREAM[:1], progress=False)
