"""Token ids for calibration and evaluation, from any corpus `moekit.data` reads."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

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


def tokenizer_for(model_name: str, tokenizer: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer given (see `tokenizer_path`), else the model's own.

    Raises:
        MoekitError: the model is refused (see `moekit.io.load.check_model`), or it has no
            tokenizer saved with it and none is given.
    """
    from moekit.data.tokenizer import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer_path(tokenizer))
    folder = own_tokenizer_folder(model_name)
    if folder is None:
        raise MoekitError(
            f"{model_name} has no tokenizer saved with it; pass --tokenizer FOLDER (a folder with tokenizer.json) "
            "or the name of a model whose tokenizer it uses."
        )
    return load_tokenizer(folder)


def tokenizer_path(tokenizer: str | os.PathLike) -> Path:
    """The folder a ``--tokenizer`` value names: a folder, or a shipped model's name
    (``moekit/ref-fine``, ``moekit/tiny-mixtral``) for that model's own tokenizer."""
    from moekit.io.load import REFERENCE_PREFIX

    spec = str(tokenizer)
    if spec.startswith(REFERENCE_PREFIX) and not Path(spec).expanduser().exists():
        folder = own_tokenizer_folder(spec)
        if folder is not None:
            return folder
    return Path(spec).expanduser()


def own_tokenizer_folder(model_name: str) -> Path | None:
    """Where ``model_name``'s own tokenizer is: beside its weights, or for the built-in tiny
    models the one they share. None when it has none. The model is checked first."""
    from moekit.io.load import check_model
    from moekit.zoo.tiny import TINY_TOKENIZER_DIR

    folder = check_model(model_name)
    if folder is None:
        return TINY_TOKENIZER_DIR
    return folder if (folder / "tokenizer.json").is_file() else None
