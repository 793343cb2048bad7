"""Token ids for calibration and evaluation, from any corpus `moekit.data` reads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from moekit.data.packing import pack, tokenize_corpus
from moekit.data.sources import load_corpus
from moekit.errors import MoekitError

DEFAULT_CALIBRATION = "stdlib:calib"
DEFAULT_EVALUATION = "stdlib:eval"


def data_fingerprint(input_ids: torch.Tensor) -> str:
    """sha256 of the token ids and their shape."""
    ids = input_ids.detach().to(torch.int64).cpu().contiguous()
    digest = hashlib.sha256(str(tuple(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class TokenData:
    """Token ids [N, S] (or a stream [L]) and where they came from."""

    input_ids: torch.Tensor
    source: str

    @property
    def fingerprint(self) -> str:
        return data_fingerprint(self.input_ids)

    def describe(self) -> dict:
        return {"data_source": self.source, "data_shape": list(self.input_ids.shape), "data_fingerprint": self.fingerprint}


def calibration_tokens(
    source: str, tokenizer: PreTrainedTokenizerBase, *, n_samples: int, seq_len: int, seed: int = 0,
    text_field: str = "text",
) -> TokenData:
    """``n_samples`` sequences of ``seq_len`` tokens drawn (seeded) from the packed corpus
    (``text_field``: the field of .jsonl/.parquet/hub rows that holds the text).

    Raises:
        MoekitError: the corpus is empty, shorter than one sequence, or holds fewer than
            ``n_samples`` sequences.
    """
    if n_samples < 1:
        raise MoekitError(f"n_samples must be at least 1 (got {n_samples}).")
    rows = pack(tokenize_corpus(load_corpus(source, text_field=text_field), tokenizer), seq_len, name=source)
    if n_samples > rows.shape[0]:
        raise MoekitError(
            f"{source} holds {rows.shape[0]} sequences of {seq_len} tokens, fewer than the {n_samples} "
            f"asked for; lower --samples or --seq-len, or add data."
        )
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:n_samples]
    return TokenData(rows[order.sort().values], source)


def evaluation_stream(source: str, tokenizer: PreTrainedTokenizerBase, *, text_field: str = "text") -> TokenData:
    """The whole corpus as one token stream [L]."""
    stream = tokenize_corpus(load_corpus(source, text_field=text_field), tokenizer).long()
    if stream.numel() < 2:
        raise MoekitError(f"{source} has fewer than 2 tokens; nothing to evaluate.")
    return TokenData(stream, source)
