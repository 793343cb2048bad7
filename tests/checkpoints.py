"""Tiny checkpoints on disk, as a user's would be: config, safetensors, a tokenizer that fits
them, and a small fixed corpus (documents of the shipped, hash-checked calibration split, so
outcomes do not change when moekit's code does)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from transformers import AutoModelForCausalLM, PretrainedConfig

import moekit.data
from moekit.zoo.tiny import randomize_, tiny_config


def write_checkpoints(root: Path, families: Iterable[str], *, documents: int = 3, vocab_size: int = 300,
                      edit: Callable[[PretrainedConfig], None] | None = None, **save) -> Path:
    """``root/data/code.py`` and, per family, ``root/<family>``: a seeded random tiny model
    (its config changed by ``edit`` first) with a BPE tokenizer trained on that corpus.
    ``save`` goes to ``save_pretrained`` (e.g. ``max_shard_size``)."""
    from moekit.data.tokenizer import save_tokenizer, train_tokenizer

    text = "".join(d.text for d in moekit.data.load_corpus("stdlib:calib").documents[:documents])
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "code.py").write_text(text)
    tokenizer = train_tokenizer([text], vocab_size=vocab_size, min_frequency=1)
    for family in families:
        config = tiny_config(family)
        config.vocab_size = len(tokenizer)
        if edit is not None:
            edit(config)
        randomize_(AutoModelForCausalLM.from_config(config)).eval().save_pretrained(root / family, **save)
        save_tokenizer(tokenizer, root / family)
    return root
