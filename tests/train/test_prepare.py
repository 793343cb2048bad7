"""A run's token cache: reused on resume, refused for other settings, redone when incomplete."""

import pytest
import torch

from moekit.errors import MoekitError
from moekit.train import prepare_data


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(200):  # enough files that the path-hash split holds some out for evaluation
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 10)
    return root


def _prepare(corpus, out, seq_len=32):
    return prepare_data(data=str(corpus), eval_data=None, tokenizer=None, vocab_size=300, seq_len=seq_len,
                        out_dir=out)


def test_a_resumed_run_sees_the_tokens_the_first_one_saw(corpus, tmp_path):
    first = _prepare(corpus, tmp_path / "run")
    (corpus / "m0.py").write_text("completely different text " * 50)  # the corpus changed since
    again = _prepare(corpus, tmp_path / "run")
    assert torch.equal(first.train_rows, again.train_rows) and torch.equal(first.eval_rows, again.eval_rows)
    with pytest.raises(MoekitError, match="was prepared for data .* seq_len 32"):
        _prepare(corpus, tmp_path / "run", seq_len=16)


def test_an_interrupted_preparation_is_done_again(corpus, tmp_path):
    fresh = _prepare(corpus, tmp_path / "fresh")
    out = tmp_path / "run"
    _prepare(corpus, out)
    (out / "data" / "manifest.json").unlink()  # as if killed before the manifest was written
    tokens = out / "data" / "tokens.safetensors"
    tokens.write_bytes(tokens.read_bytes()[:100])  # ... and in the middle of the token file
    again = _prepare(corpus, out)
    assert torch.equal(fresh.train_rows, again.train_rows) and torch.equal(fresh.eval_rows, again.eval_rows)
