"""Local corpora other than the stdlib, for benchmarks that need several domains.

The machines this is developed on have no network, so the second and third domains come
from the machine itself: rendered section-1 man pages (``man``) and the plain-text and
Markdown documentation under /usr/share/doc (``docs``). Each is cut into ``train`` and
``eval`` by a hash of the file name (so the cut does not depend on what else is
installed), rendered once into a folder under /tmp, and read back by moekit's folder
corpus reader. The byte budgets keep rendering to a minute or two.

    python benchmarks/corpora.py man train     # prints the folder

``stdlib_sample`` and ``mixture`` write the stdlib (and mixtures of corpora) the same way,
for training runs that read one folder.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(os.environ.get("MOEKIT_CORPORA", "/tmp/moekit-corpora"))
BUDGET = {"train": 3_000_000, "eval": 300_000}  # bytes of text per split
MAN_DIR = Path("/usr/share/man/man1")
DOC_DIRS = (Path("/usr/share/doc"),)
DOC_SUFFIXES = (".md", ".txt", ".rst", ".md.gz", ".txt.gz")


def _split_of(name: str) -> str:
    return "eval" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0 else "train"


def _ordered(paths: list[Path]) -> list[Path]:
    """A fixed pseudo-random order, so a byte budget takes a spread of topics, not 'a*'."""
    return sorted(paths, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())


def _render_man(path: Path) -> str:
    env = dict(os.environ, MANWIDTH="80", LANG="C", LC_ALL="C", MAN_KEEP_FORMATTING="0")
    rendered = subprocess.run(["man", "-l", str(path)], capture_output=True, env=env, timeout=30)
    if rendered.returncode != 0:
        return ""
    plain = subprocess.run(["col", "-bx"], input=rendered.stdout, capture_output=True, timeout=30)
    return plain.stdout.decode("utf-8", "replace")


def _read_doc(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", "replace")


def _sources(kind: str) -> tuple[list[Path], callable]:
    if kind == "man":
        # 16 000 of this machine's pages are near-identical gcloud subcommand pages
        return [p for p in MAN_DIR.glob("*.1*") if not p.name.startswith("gcloud")], _render_man
    if kind == "docs":
        found = [p for d in DOC_DIRS if d.is_dir() for p in d.rglob("*") if p.is_file()
                 and p.name.endswith(DOC_SUFFIXES) and not p.name.lower().startswith(("copyright", "changelog"))]
        return found, _read_doc
    raise SystemExit(f"unknown corpus {kind!r}: choose man or docs")


def corpus(kind: str, split: str) -> Path:
    """The folder of ``.txt`` files holding ``split`` of local corpus ``kind``, rendered once."""
    folder = ROOT / f"{kind}-{split}"
    if (folder / ".complete").is_file():
        return folder
    paths, read = _sources(kind)
    if not paths:
        raise SystemExit(f"no {kind} sources on this machine ({MAN_DIR if kind == 'man' else DOC_DIRS})")
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in _ordered([p for p in paths if _split_of(p.name) == split]):
        text = read(path)
        if len(text) < 500:  # stubs and "see also" pages teach nothing
            continue
        (folder / f"{path.name}.txt").write_text(text, encoding="utf-8")
        total += len(text.encode())
        if total >= BUDGET[split]:
            break
    (folder / ".complete").write_text(str(total))
    return folder


def stdlib_sample(split: str) -> Path:
    """The stdlib's own ``split`` (train: a byte-budget sample of it, so that a mixture with
    another corpus is balanced; eval: the shipped split, written out)."""
    folder = ROOT / f"stdlib-{split}"
    if (folder / ".complete").is_file():
        return folder
    from moekit.data.sources import load_corpus

    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    documents = load_corpus("stdlib" if split == "train" else "stdlib:eval").documents
    for index, doc in enumerate(sorted(documents, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())):
        (folder / f"{index:05d}.txt").write_text(doc.text, encoding="utf-8")
        total += len(doc.text.encode())
        if split == "train" and total >= BUDGET[split]:
            break
    (folder / ".complete").write_text(str(total))
    return folder


def mixture(kinds: list[str], split: str) -> Path:
    """One folder holding ``split`` of each corpus in ``kinds`` (stdlib, man, docs), equal budgets."""
    folder = ROOT / f"{'+'.join(kinds)}-{split}"
    if (folder / ".complete").is_file():
        return folder
    for kind in kinds:
        part = stdlib_sample(split) if kind == "stdlib" else corpus(kind, split)
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for file in part.glob("*.txt"):
            (folder / kind / file.name).write_bytes(file.read_bytes())
    (folder / ".complete").write_text("")
    return folder


if __name__ == "__main__":
    print(corpus(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "train"))
