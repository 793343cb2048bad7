"""Token ids for calibration and evaluation, from any corpus `moekit.data` reads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from moekit.data.corpus import load_corpus
from moekit.data.packing import pack, tokenize_corpus
from moekit.errors import MoekitError

DEFAULT_CALIBRATION = "stdlib:calib"
DEFAULT_EVALUATION = "stdlib:eval"


@dataclass
class TokenData:
    """Token ids [N, S] (or a stream [L]) and where they came from."""

    input_ids: torch.Tensor
    source: str

    @property
    def fingerprint(self) -> str:
        from moekit.calib.stats import data_fingerprint

        return data_fingerprint(self.input_ids)

    def describe(self) -> dict:
        return {"data_source": self.source, "data_shape": list(self.input_ids.shape), "data_fingerprint": self.fingerprint}


def calibration_tokens(
    source: str, tokenizer: PreTrainedTokenizerBase, *, n_samples: int, seq_len: int, seed: int = 0
) -> TokenData:
    """``n_samples`` sequences of ``seq_len`` tokens drawn (seeded) from the packed corpus.

    Raises:
        MoekitError: the corpus is empty, shorter than one sequence, or holds fewer than
            ``n_samples`` sequences.
    """
    if n_samples < 1:
        raise MoekitError(f"n_samples must be at least 1 (got {n_samples}).")
    rows = pack(tokenize_corpus(load_corpus(source), tokenizer), seq_len, name=source)
    if n_samples > rows.shape[0]:
        raise MoekitError(
            f"{source} holds {rows.shape[0]} sequences of {seq_len} tokens, fewer than the {n_samples} "
            f"asked for; lower --samples or --seq-len, or add data."
        )
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:n_samples]
    return TokenData(rows[order.sort().values], source)


def evaluation_stream(source: str, tokenizer: PreTrainedTokenizerBase) -> TokenData:
    """The whole corpus as one token stream [L]."""
    stream = tokenize_corpus(load_corpus(source), tokenizer).long()
    if stream.numel() < 2:
        raise MoekitError(f"{source} has fewer than 2 tokens; nothing to evaluate.")
    return TokenData(stream, source)


def tokenizer_for(model_name: str, tokenizer: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer given, else the one saved with the model.

    Raises:
        MoekitError: neither exists (the tiny built-in models have none).
    """
    from moekit.data.tokenizer import load_tokenizer
    from moekit.io.load import resolve_folder

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    folder = resolve_folder(model_name)
    if folder is None or not (Path(folder) / "tokenizer.json").is_file():
        raise MoekitError(
            f"{model_name} has no tokenizer saved with it; pass --tokenizer FOLDER (a folder with tokenizer.json)."
        )
    return load_tokenizer(folder)
