"""Packing documents into fixed-length rows."""

import math

import pytest
import torch

from moekit.data import Corpus, Document, pack, tokenize_corpus, train_tokenizer, unigram_log_perplexity
from moekit.errors import MoekitError


def test_documents_are_separated_by_eos_and_cut_into_rows():
    tok = train_tokenizer(["abc def ghi " * 10], vocab_size=270)
    corpus = Corpus([Document("a", "abc def"), Document("b", "ghi")], source="t")
    stream = tokenize_corpus(corpus, tok)
    assert (stream == tok.eos_token_id).sum() == 2 and stream[-1] == tok.eos_token_id
    rows = pack(stream, 2)
    assert rows.shape == (stream.numel() // 2, 2) and rows.dtype == torch.int64
    assert torch.equal(rows.reshape(-1), stream[: rows.numel()].long())


def test_a_corpus_shorter_than_one_sequence_is_refused():
    with pytest.raises(MoekitError, match="fewer than one sequence"):
        pack(torch.arange(10, dtype=torch.int32), 64)


def test_unigram_perplexity_of_a_uniform_stream_is_the_vocabulary():
    stream = torch.arange(100).repeat(50)
    assert math.exp(unigram_log_perplexity(stream, stream.view(50, 100), 100)) == pytest.approx(100, rel=1e-3)
