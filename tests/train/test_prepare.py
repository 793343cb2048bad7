"""A run's token cache: reused on resume, refused for other settings, redone when incomplete,
readable as the umask says; its preparation shows progress in kB of text."""

import io
import os
import re
import stat

import pytest
import torch
from rich.console import Console

from moekit.data import load_corpus, tokenize_corpus, train_tokenizer
from moekit.data.corpus import in_batches
from moekit.errors import MoekitError
from moekit.train import prepare_data


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(200):  # enough files that the path-hash split holds some out for evaluation
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 10)
    return root


def _prepare(corpus, out, seq_len=32, **kwargs):
    return prepare_data(data=str(corpus), eval_data=None, tokenizer=None, vocab_size=300, seq_len=seq_len,
                        out_dir=out, **kwargs)


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


def test_the_cache_gets_the_modes_the_umask_asks_for(corpus, tmp_path):
    previous = os.umask(0o022)
    try:
        _prepare(corpus, tmp_path / "run")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "tokens.safetensors" for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def test_work_on_text_reports_its_bytes(corpus):
    text = load_corpus(str(corpus))
    text.documents[0] = type(text.documents[0])("é.py", "é = 'ü'\n" * 40)  # bytes, not characters
    read, done = [], []
    tok = train_tokenizer(text.texts(), vocab_size=300, on_progress=read.append)
    stream = tokenize_corpus(text, tok, on_progress=done.append)
    assert sum(read) == sum(done) == text.num_bytes > text.num_chars
    ids = [i for d in text.documents for i in tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert stream.tolist() == ids
    batches = list(in_batches(["ab", "cde", "é", "fghijk", "l"], max_bytes=4))
    assert batches == [(["ab", "cde"], 5), (["é", "fghijk"], 8), (["l"], 1)]


def test_preparing_shows_progress_in_kilobytes(corpus, tmp_path, monkeypatch):
    """Redirected output (no terminal) gets plain lines for both long stages, ending at the
    corpus's size in kB; a resumed run reads its cache silently."""
    monkeypatch.setattr("moekit.data.corpus.BATCH_BYTES", 4000)  # a 70 kB corpus in many steps
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    _prepare(corpus, tmp_path / "run", progress=True, console=console)
    text = out.getvalue()
    assert text.startswith(f"preparing the data of {tmp_path / 'run'}: reading")
    train_kb = re.findall(r"^training a 300-token tokenizer (\d+)/(\d+) .*kB/s$", text, flags=re.M)
    all_kb = re.findall(r"^tokenizing (\d+)/(\d+) .*kB/s$", text, flags=re.M)
    assert len(train_kb) > 1 and len(all_kb) > 1
    assert train_kb[-1][0] == train_kb[-1][1] and all_kb[-1][0] == all_kb[-1][1]
    total = load_corpus(str(corpus)).num_bytes
    assert int(train_kb[-1][1]) <= int(all_kb[-1][1]) == -(-total // 1000)  # eval files: tokenized, not trained on
    again = io.StringIO()
    _prepare(corpus, tmp_path / "run", progress=True, console=Console(file=again, force_terminal=False))
    assert again.getvalue() == ""
