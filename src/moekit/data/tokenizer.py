"""Byte-level BPE tokenizers trained with the ``tokenizers`` library.

Byte-level means every string round-trips exactly (no unknown token, no normalisation),
which code needs: indentation and odd characters must survive. The result is saved as
a standard Hugging Face fast tokenizer (``tokenizer.json`` + config) that
``AutoTokenizer.from_pretrained`` loads without moekit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moekit.data.corpus import in_batches
from moekit.errors import MoekitError, read_json

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 8192, min_frequency: int = 2,
    on_progress: Callable[[int], None] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens (specials included) on ``texts``.

    The 256 byte symbols are always in the vocabulary, so nothing is ever unknown.
    ``on_progress(n)`` is called as the trainer reads the texts, with the UTF-8 bytes read
    since the last call. Reading and counting words is most of the time (10 of 12 s on the
    stdlib corpus); the merges computed after it report nothing.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise MoekitError(f"vocab_size {vocab_size} is too small for a byte-level BPE; use at least 259.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if on_progress is None else _reporting(texts, on_progress), trainer=trainer)
    return wrap(tok)


def _reporting(texts: Iterable[str], on_progress: Callable[[int], None]) -> Iterator[str]:
    for batch, size in in_batches(texts):
        yield from batch
        on_progress(size)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A raw ``tokenizers.Tokenizer`` as a transformers fast tokenizer with bos/eos/pad."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,  # would alter code such as "a ,b"
        model_max_length=1_000_000,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer folder (or a model folder that holds one)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise MoekitError(f"no tokenizer.json in {path}; train one with `moekit train` or point at a model folder.")
    for file in (path / "tokenizer.json", path / "tokenizer_config.json"):
        if file.is_file():
            read_json(file, fix="save the tokenizer again or point at another folder.")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as exc:  # tokenizers raises a bare Exception for JSON that is no tokenizer
        raise MoekitError(
            f"{path / 'tokenizer.json'} is not a tokenizer transformers can read ({str(exc).splitlines()[0]}); "
            "save the tokenizer again or point at another folder."
        ) from None
    if tokenizer.eos_token_id is None:
        raise MoekitError(f"the tokenizer in {path} has no eos token; moekit needs one to separate documents.")
    return tokenizer
