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


def test_max_tokens_takes_windows_spread_over_the_whole_stream():
    """``max_tokens`` scores whole windows of the full evaluation (each with the full left
    context and ``stride`` tokens), evenly spaced from the start of the stream to its end,
    not its first tokens."""
    from moekit.eval.perplexity import spread

    length, context, stride = 1000, 32, 16
    jobs = [(None, w) for w in windows(length, context, stride)]
    chosen = [w for _, w in spread(jobs, 160)]
    assert len(chosen) == 10 and set(chosen) <= {w for _, w in jobs}
    assert all(end - first == stride and first > 1 for _, end, first in chosen)
    firsts = [first for _, _, first in chosen]
    assert firsts[0] <= length / 10 and firsts[-1] + stride >= length - length / 10  # covers the stream
    gaps = [b - a for a, b in zip(firsts, firsts[1:])]
    assert max(gaps) - min(gaps) <= stride  # evenly: equal gaps up to one window
    assert spread(jobs, length) == jobs  # all of it when it fits


def test_max_tokens_scores_the_chosen_windows_as_the_whole_evaluation_does():
    """Over STREAM (45 tokens, windows of 16 by 8), 16 tokens are the two full windows at the
    ends of the spread, (8, 24) and (24, 40): the hand computation over just those."""
    model = tiny_model("qwen3_moe")
    result = evaluate(model, STREAM, context_length=16, stride=8, max_tokens=16, progress=False)
    nll, n = 0.0, 0
    for begin, end, first in [(8, 24, 16), (24, 40, 32)]:
        with torch.no_grad():
            logits = model(STREAM[begin:end][None]).logits[0]
        for pos in range(first, end):
            nll -= (logits[pos - begin - 1].log_softmax(-1)[STREAM[pos]]).item()
            n += 1
    assert result.tokens == n == 16 and math.isclose(result.nll, nll / n, rel_tol=1e-5)
    whole = evaluate(model, STREAM, context_length=16, stride=8, progress=False)
    assert evaluate(model, STREAM, context_length=16, stride=8, max_tokens=1000, progress=False) == whole


def test_max_tokens_estimates_the_whole_where_the_first_tokens_do_not():
    """The stdlib split opens with codec tables, which a trained model predicts almost
    perfectly: its first 4,096 tokens gave perplexity 7.97 against 6.86 for the whole split.
    Here a table of that kind opens three files of the split: the first 1,024 tokens are the
    table alone, far from the whole; 1,024 tokens spread over the stream are close to it."""
    from moekit.data import load_corpus
    from moekit.io.tokenizer import tokenizer_for

    docs = load_corpus("stdlib:eval").documents
    table = "".join(f"    '\\x{i:02x}'     #  0x{i:02X} -> LATIN CHARACTER {i}\n" for i in range(128))
    ids = torch.tensor(tokenizer_for("moekit/ref-fine")(table + docs[10].text + docs[20].text + docs[30].text)
                       .input_ids)
    model, options = moekit.load("moekit/ref-fine"), dict(context_length=64, stride=32, progress=False, routing=False)
    whole = evaluate(model, ids, **options).perplexity
    first = evaluate(model, ids[:1024], **options).perplexity
    spread = evaluate(model, ids, max_tokens=1024, **options)
    assert spread.tokens == 1024 and len(ids) > 3 * 1024
    assert abs(first - whole) > 0.25 * whole and abs(spread.perplexity - whole) < 0.05 * whole
