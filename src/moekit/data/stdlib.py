"""The built-in ``stdlib`` corpus: the running interpreter's standard-library sources.

Every Python installation carries them, so a first run needs no download. Files are
split by a hash of their path relative to the stdlib root (POSIX form), which does not
depend on the machine, the file order or the file contents:

    bucket = int(sha256(relpath)[:8], 16) % 1000
    eval:  bucket <  20   (~2% of files)
    calib: 20 <= bucket < 40
    train: the rest

The eval and calib splits that published numbers use are *fixed text* shipped inside
the package (`moekit.data.shipped`), so they are the same on every Python version; the
train split is read from the local stdlib, minus every path the shipped splits hold.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from moekit.data.corpus import Document

SPLITS = ("train", "calib", "eval")
_BUCKETS = 1000
_EVAL_END, _CALIB_END = 20, 40
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """``train`` / ``calib`` / ``eval`` for a stdlib path such as ``json/decoder.py``."""
    bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) % _BUCKETS
    if bucket < _EVAL_END:
        return "eval"
    if bucket < _CALIB_END:
        return "calib"
    return "train"


def scan_stdlib(root: Path | None = None) -> tuple[dict[str, list[Document]], int]:
    """All UTF-8 ``.py`` files under ``root`` grouped by split, in path order, and the
    number of files skipped because they are not valid UTF-8 (test fixtures in other
    encodings; decoding them lossily would teach the model mojibake)."""
    root = root or stdlib_root()
    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    not_utf8 = 0
    paths = sorted(
        (p for p in root.rglob("*.py") if p.is_file() and not _EXCLUDED_DIRS & set(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            not_utf8 += 1
            continue
        if text:
            splits[split_of(rel)].append(Document(rel, text))
    return splits, not_utf8


def split_sha256(documents: list[Document]) -> str:
    """Hash of a split: sha256 over ``path \\0 text \\0`` of each document, in order."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.name.encode("utf-8") + b"\0" + doc.text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def manifest(documents: list[Document]) -> dict:
    """Files of a split with their sizes and sha256, plus the split's own sha256."""
    return {
        "num_files": len(documents),
        "num_chars": sum(len(d.text) for d in documents),
        "sha256": split_sha256(documents),
        "files": [
            {"path": d.name, "chars": len(d.text), "sha256": hashlib.sha256(d.text.encode("utf-8")).hexdigest()}
            for d in documents
        ],
    }
