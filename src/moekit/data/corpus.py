"""Text corpora from local files, directories, globs, built-in splits and hub datasets.

A corpus is a list of `Document` s (a name and its text). Readers never guess silently:
an unreadable or missing source is a `MoekitError` that names it, and files that are not
UTF-8 are skipped and counted rather than decoded lossily.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

TEXT_SUFFIXES = (".txt", ".py", ".md")
TABLE_SUFFIXES = (".jsonl", ".parquet")
SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES
BATCH_BYTES = 1 << 20  # `in_batches`: a megabyte tokenizes in about a second on one core


@dataclass(frozen=True)
class Document:
    """One unit of text; ``name`` is its file (relative where meaningful) or row id."""

    name: str
    text: str


@dataclass
class Corpus:
    """Documents plus what was left out and why (``skipped`` maps reason -> count)."""

    documents: list[Document]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of all texts: the unit long text work reports its progress in."""
        return sum(len(d.text.encode("utf-8")) for d in self.documents)

    def texts(self) -> list[str]:
        return [d.text for d in self.documents]

    def __len__(self) -> int:
        return len(self.documents)


def in_batches(texts: Iterable[str], max_bytes: int | None = None) -> Iterator[tuple[list[str], int]]:
    """Consecutive runs of ``texts`` of about ``max_bytes`` (`BATCH_BYTES`) of UTF-8 each (a
    longer text is a run of its own), with their sizes: work done run by run can report its
    progress every megabyte instead of once per text, which costs more than the work for
    short ones."""
    max_bytes = max_bytes or BATCH_BYTES
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text.encode("utf-8"))
        if size >= max_bytes:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size
