"""Token streams packed into fixed-length training sequences.

Documents are tokenized, each followed by the eos token, concatenated into one stream
and cut into rows of ``seq_len`` tokens; the tail that does not fill a row is dropped.
Packing wastes no compute on padding and makes every batch the same shape, which keeps
CPU throughput steady and makes runs bitwise reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from moekit.data.corpus import Corpus, in_batches
from moekit.errors import MoekitError


def tokenize_corpus(
    corpus: Corpus, tokenizer: PreTrainedTokenizerBase, *, on_progress: Callable[[int], None] | None = None
) -> torch.Tensor:
    """The whole corpus as one stream of token ids [N] (int32), eos after each document.

    ``on_progress(n)`` is called after each megabyte or so with the UTF-8 bytes just
    tokenized; the calls add up to ``corpus.num_bytes``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MoekitError("the tokenizer has no eos token; moekit needs one to separate documents.")
    separator = torch.tensor([eos], dtype=torch.int32)
    pieces = []
    for texts, size in in_batches(corpus.texts()):
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            pieces += [torch.tensor(ids, dtype=torch.int32), separator]
        if on_progress is not None:
            on_progress(size)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)


def pack(stream: torch.Tensor, seq_len: int, *, name: str = "corpus") -> torch.Tensor:
    """Cut a token stream [N] into rows [N // seq_len, seq_len] (int64).

    Raises:
        MoekitError: the stream is shorter than one row.
    """
    if seq_len < 2:
        raise MoekitError(f"seq_len must be at least 2 (got {seq_len}).")
    rows = stream.numel() // seq_len
    if rows == 0:
        raise MoekitError(
            f"{name} has {stream.numel()} tokens, fewer than one sequence of {seq_len}; "
            "add more text or lower --seq-len."
        )
    return stream[: rows * seq_len].view(rows, seq_len).long()


def unigram_log_perplexity(train: torch.Tensor, evaluation: torch.Tensor, vocab_size: int) -> float:
    """Natural-log perplexity on ``evaluation`` of an add-one unigram model fitted on ``train``.

    The floor any language model must beat by far; ``exp`` of it is the perplexity.
    Both tensors hold token ids; only next-token positions count (the first token of
    each row has no prediction), matching how causal LM loss is computed.
    """
    counts = torch.bincount(train.reshape(-1).long(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = evaluation[..., 1:].reshape(-1).long() if evaluation.ndim == 2 else evaluation.long()
    return float(-logp[targets].mean())
