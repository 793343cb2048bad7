"""Corpora, tokenizers, packed sequences and the shipped calibration/evaluation texts."""

from moekit.data.corpus import Corpus, Document
from moekit.data.packing import pack, tokenize_corpus, unigram_log_perplexity
from moekit.data.shipped import read_shipped, stdlib_corpus, write_shipped
from moekit.data.sources import load_corpus
from moekit.data.stdlib import split_of
from moekit.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

__all__ = [
    "Corpus",
    "Document",
    "load_corpus",
    "load_tokenizer",
    "pack",
    "read_shipped",
    "save_tokenizer",
    "split_of",
    "stdlib_corpus",
    "tokenize_corpus",
    "train_tokenizer",
    "unigram_log_perplexity",
    "write_shipped",
]
