"""The tiny models and the tokenizer they share: reproducible, matching, and tiny."""

from __future__ import annotations

import pytest

from moekit.data.tokenizer import load_tokenizer
from moekit.zoo.tiny import TINY_CONFIGS, TINY_TOKENIZER_DIR, TINY_VOCAB, make_tiny_tokenizer, tiny_config, tiny_model


def test_the_shipped_tokenizer_is_what_the_script_makes(tmp_path):
    make_tiny_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_tiny_model_fits_the_tokenizer_and_stays_tiny(family):
    tokenizer, config = load_tokenizer(TINY_TOKENIZER_DIR), tiny_config(family)
    assert len(tokenizer) == TINY_VOCAB == config.vocab_size
    special = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert special == (config.pad_token_id, config.bos_token_id, config.eos_token_id)
    assert config.max_position_embeddings >= 256  # every command's default sequence length
    # tests build these models hundreds of times: a size that grew would slow the whole suite
    assert sum(p.numel() for p in tiny_model(family).parameters()) < 150_000


def test_the_tokenizer_is_small_on_disk():
    assert sum(p.stat().st_size for p in TINY_TOKENIZER_DIR.iterdir()) < 32_000
