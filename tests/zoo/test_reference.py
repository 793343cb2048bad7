"""The shipped reference models load offline and reach their documented numbers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import moekit
from moekit.data import load_corpus, pack, tokenize_corpus
from moekit.io.tokenizer import tokenizer_for
from moekit.eval.perplexity import evaluate
from moekit.io.load import ZOO_DIR

SHIPPED = sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("name", SHIPPED)
def test_reference_is_small_bf16_and_documented(name):
    folder = ZOO_DIR / name
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 25 * 10**6
    with safe_open(weights, framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    report = json.loads((folder / "training.json").read_text())
    assert report["criteria"]["pass"]
    card = (folder / "README.md").read_text()
    assert f"{report['eval']['perplexity']:.2f}" in card


@pytest.fixture
def two_threads():
    """A 12 M-parameter model does use both cores (the suite otherwise runs on one)."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", SHIPPED)
def test_reference_reaches_its_documented_perplexity(name, monkeypatch, two_threads):
    """On every 8th row of the eval split, the sample `scripts/train_reference.py` documents
    beside the whole split's numbers (the whole split takes minutes per model)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = json.loads((ZOO_DIR / name / "training.json").read_text())
    sample = report["eval"]["sample"]
    model = moekit.load(f"moekit/{name}")
    assert next(model.parameters()).dtype == torch.float32
    rows = pack(tokenize_corpus(load_corpus("stdlib:eval"), tokenizer_for(f"moekit/{name}")), report["seq_len"])
    result = evaluate(model, rows[::sample["every"]], context_length=rows.shape[1], stride=rows.shape[1] - 1,
                      batch_size=16, progress=False, routing=False)
    assert result.tokens == sample["tokens"]
    assert abs(result.perplexity / sample["perplexity"] - 1) < 0.01
    assert abs(result.accuracy - sample["accuracy"]) < 0.01
