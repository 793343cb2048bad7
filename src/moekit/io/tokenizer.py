"""The tokenizer a model name means: a ``--tokenizer`` folder or shipped model's name, or the
one saved beside the model's weights (for the built-in tiny models, the one they share)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from moekit.data.tokenizer import load_tokenizer
from moekit.errors import MoekitError
from moekit.io.load import REFERENCE_PREFIX, check_model


def tokenizer_for(model_name: str, tokenizer: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer given (see `tokenizer_path`), else the model's own.

    Raises:
        MoekitError: the model is refused (see `moekit.io.load.check_model`), or it has no
            tokenizer saved with it and none is given.
    """
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
    spec = str(tokenizer)
    if spec.startswith(REFERENCE_PREFIX) and not Path(spec).expanduser().exists():
        folder = own_tokenizer_folder(spec)
        if folder is not None:
            return folder
    return Path(spec).expanduser()


def own_tokenizer_folder(model_name: str) -> Path | None:
    """Where ``model_name``'s own tokenizer is: beside its weights, or for the built-in tiny
    models the one they share. None when it has none. The model is checked first."""
    from moekit.zoo.tiny import TINY_TOKENIZER_DIR

    folder = check_model(model_name)
    if folder is None:
        return TINY_TOKENIZER_DIR
    return folder if (folder / "tokenizer.json").is_file() else None
