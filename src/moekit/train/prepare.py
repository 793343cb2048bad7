"""Turning a corpus into the packed token rows of a run, cached in the run folder.

The first invocation reads the corpus, trains (or loads) the tokenizer, tokenizes and
packs, and stores the token streams in ``<out>/data/tokens.safetensors`` with a
manifest. A resumed run reads that cache instead, so it sees exactly the tokens the
interrupted run saw even if the files on disk changed since.

Training the tokenizer and tokenizing take most of a minute on the stdlib corpus, so each
shows a bar in kB of text with its rate.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from moekit.data.corpus import Corpus
from moekit.data.sources import load_corpus
from moekit.data.packing import pack, tokenize_corpus, unigram_log_perplexity
from moekit.data.stdlib import manifest, split_of
from moekit.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from moekit.errors import MoekitError
from moekit.io.save import _usual_permissions, write_json_atomically
from moekit.progress import progress_bar


@dataclass
class RunData:
    """Packed rows [N, L] for training and evaluation, the tokenizer, and provenance."""

    train_rows: torch.Tensor
    eval_rows: torch.Tensor | None
    tokenizer: PreTrainedTokenizerFast
    info: dict


def prepare_data(
    *, data: str, eval_data: str | None, tokenizer: str | None, vocab_size: int, seq_len: int, out_dir: Path,
    text_field: str = "text", progress: bool = False, console=None,
) -> RunData:
    """Rows for a run in ``out_dir``; reuses ``out_dir/data`` when it exists.

    ``eval_data`` defaults to ``stdlib:eval`` for the ``stdlib`` corpus and otherwise to
    the documents of ``data`` that `moekit.data.stdlib.split_of` puts in ``eval``.
    ``tokenizer`` is a folder to load; None trains one of ``vocab_size`` on the train text.
    ``progress`` shows what is being done, with bars, on ``console``.
    """
    cache, tok_dir = out_dir / "data", out_dir / "tokenizer"
    # manifest.json is written last and atomically: it marks a preparation as complete, so a
    # run interrupted while preparing prepares again instead of reading half a file.
    if (cache / "manifest.json").is_file():
        info = json.loads((cache / "manifest.json").read_text())
        if info["data"] != data or info["seq_len"] != seq_len:
            raise MoekitError(f"{out_dir} was prepared for data {info['data']!r}, seq_len {info['seq_len']}; "
                              "use the same settings to resume, or a new --out.")
        streams = load_file(str(cache / "tokens.safetensors"))
        tok = load_tokenizer(tok_dir)
        eval_stream = streams.get("eval")
        return RunData(pack(streams["train"], seq_len), None if eval_stream is None else pack(eval_stream, seq_len),
                       tok, info)
    if progress:
        from rich.console import Console

        console = console or Console(stderr=True)
        # paths as typed: not read as rich markup
        console.print(f"preparing the data of {out_dir}: reading {data!r}", markup=False, highlight=False)
    train_corpus = load_corpus(data, text_field=text_field)
    eval_corpus = _eval_corpus(data, eval_data, text_field, train_corpus)
    if eval_data is None and eval_corpus is not None and data not in ("stdlib", "stdlib:train"):
        held = {d.name for d in eval_corpus.documents}
        train_corpus = Corpus([d for d in train_corpus.documents if d.name not in held], train_corpus.source,
                              train_corpus.skipped)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        with _kilobytes(f"training a {vocab_size}-token tokenizer", train_corpus.num_bytes, progress, console) as read:
            tok = train_tokenizer(train_corpus.texts(), vocab_size=vocab_size, on_progress=read)
    corpora = [train_corpus] + ([eval_corpus] if eval_corpus is not None else [])
    with _kilobytes("tokenizing", sum(c.num_bytes for c in corpora), progress, console) as done:
        streams = {name: tokenize_corpus(corpus, tok, on_progress=done)
                   for name, corpus in zip(("train", "eval"), corpora)}
    train_stream = streams["train"]
    train_rows = pack(train_stream, seq_len, name=f"training corpus {data!r}")
    eval_rows = None
    if eval_corpus is not None:
        eval_rows = pack(streams["eval"], seq_len, name=f"evaluation corpus {eval_corpus.source!r}")
    info = {
        "data": data, "eval_data": eval_corpus.source if eval_corpus else None, "seq_len": seq_len,
        "vocab_size": len(tok), "train_tokens": train_stream.numel(),
        "eval_tokens": streams["eval"].numel() if eval_corpus else 0,
        "skipped": train_corpus.skipped,
        "train": manifest(train_corpus.documents),
        "eval": manifest(eval_corpus.documents) if eval_corpus else None,
    }
    if eval_corpus is not None:
        info["unigram_eval_perplexity"] = float(torch.tensor(
            unigram_log_perplexity(train_stream, eval_rows, len(tok))).exp())
    cache.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, tok_dir)
    save_file(streams, str(cache / "tokens.safetensors"))
    _usual_permissions(cache)  # safetensors writes 0600
    write_json_atomically(cache / "manifest.json", info)
    return RunData(train_rows, eval_rows, tok, info)


@contextlib.contextmanager
def _kilobytes(title: str, total_bytes: int, enabled: bool, console) -> Iterator[Callable[[int], None]]:
    """A bar in kB (rounded up) of text for work that reports bytes."""
    with progress_bar(title, total=-(-total_bytes // 1000), unit="kB", enabled=enabled, console=console) as advance:
        done = 0

        def report(n: int) -> None:
            nonlocal done
            before, done = -(-done // 1000), done + n
            if -(-done // 1000) > before:
                advance(-(-done // 1000) - before)

        yield report


def _eval_corpus(data: str, eval_data: str | None, text_field: str, corpus: Corpus) -> Corpus | None:
    if eval_data is not None:
        return load_corpus(eval_data, text_field=text_field)
    if data in ("stdlib", "stdlib:train"):
        return load_corpus("stdlib:eval")
    held = [d for d in corpus.documents if split_of(d.name) == "eval"]
    return Corpus(held, source=f"{data} (eval by path hash)") if held else None
