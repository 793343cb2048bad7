"""The fixed calibration and evaluation texts shipped inside the package.

They were cut once from a CPython standard library by `moekit.data.stdlib.split_of`
and are stored as xz-compressed JSON lines (``{"path": ..., "text": ...}``) next to a
``manifest.json`` holding each split's file list and sha256. Reading verifies the hash,
so a number computed on ``stdlib:eval`` means the same text everywhere.
"""

from __future__ import annotations

import json
import lzma
import platform
from functools import lru_cache
from pathlib import Path

from moekit.data.corpus import Corpus, Document
from moekit.data.stdlib import _CALIB_END, _EVAL_END, SPLITS, manifest, scan_stdlib, split_sha256
from moekit.errors import MoekitError

SHIPPED_DIR = Path(__file__).parent / "shipped"
SHIPPED_SPLITS = ("calib", "eval")


def _split_file(split: str, directory: Path) -> Path:
    return directory / f"stdlib-{split}.jsonl.xz"


@lru_cache(maxsize=4)
def _read(split: str, directory: Path) -> tuple[Document, ...]:
    path = _split_file(split, directory)
    manifest_path = directory / "manifest.json"
    if not path.is_file() or not manifest_path.is_file():
        raise MoekitError(
            f"the shipped split {split!r} is missing from {directory}; reinstall moekit "
            "or regenerate it with `python scripts/make_shipped_splits.py`."
        )
    with lzma.open(path, "rt", encoding="utf-8") as handle:
        docs = tuple(Document(row["path"], row["text"]) for row in map(json.loads, handle))
    expected = json.loads(manifest_path.read_text())["splits"][split]["sha256"]
    if split_sha256(list(docs)) != expected:
        raise MoekitError(f"{path} does not match its sha256 in manifest.json; the file is corrupt, reinstall moekit.")
    return docs


def read_shipped(split: str, directory: Path = SHIPPED_DIR) -> list[Document]:
    """The documents of a shipped split (``calib`` or ``eval``), hash-verified."""
    if split not in SHIPPED_SPLITS:
        raise MoekitError(f"no shipped split {split!r}; shipped splits are {SHIPPED_SPLITS}.")
    return list(_read(split, directory))


def shipped_paths(directory: Path = SHIPPED_DIR) -> set[str]:
    """Every stdlib path held by a shipped split (empty before they were generated)."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return set()
    splits = json.loads(manifest_path.read_text())["splits"]
    return {f["path"] for name in SHIPPED_SPLITS for f in splits[name]["files"]}


def write_shipped(directory: Path = SHIPPED_DIR, root: Path | None = None) -> dict:
    """Cut calib/eval from the local stdlib and write them (done once, by maintainers)."""
    splits, not_utf8 = scan_stdlib(root)
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "source": "CPython standard library (.py files, UTF-8 only)",
        "python": platform.python_version(),
        "rule": f"bucket = int(sha256(relpath)[:8], 16) % 1000; eval < {_EVAL_END} <= calib < {_CALIB_END} <= train",
        "skipped_not_utf8": not_utf8,
        "splits": {},
    }
    for split in SHIPPED_SPLITS:
        with lzma.open(_split_file(split, directory), "wt", encoding="utf-8", preset=9) as handle:
            for doc in splits[split]:
                handle.write(json.dumps({"path": doc.name, "text": doc.text}, ensure_ascii=False) + "\n")
        info["splits"][split] = manifest(splits[split])
    (directory / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")
    _read.cache_clear()
    return info


def stdlib_corpus(split: str = "train") -> Corpus:
    """The ``stdlib`` corpus, one split.

    ``train`` comes from the local standard library; ``calib`` and ``eval`` from the
    files shipped with moekit (identical on every machine).
    """
    if split not in SPLITS:
        raise MoekitError(f"unknown stdlib split {split!r}; use one of {', '.join(SPLITS)}.")
    if split != "train":
        return Corpus(read_shipped(split), source=f"stdlib:{split}")
    splits, not_utf8 = scan_stdlib()
    # A path shipped as calib/eval never trains, even if this Python's copy differs.
    held_out = shipped_paths()
    docs = [d for d in splits["train"] if d.name not in held_out]
    return Corpus(docs, source="stdlib:train", skipped={"not utf-8": not_utf8} if not_utf8 else {})
