"""Reading a corpus from what a user names: the shipped and local `stdlib` splits, files,
folders and globs of text, JSON lines and parquet, or a hub dataset."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from moekit.data.corpus import SUFFIXES, Corpus, Document
from moekit.data.shipped import stdlib_corpus
from moekit.errors import MoekitError


def load_corpus(source: str | Path, *, text_field: str = "text") -> Corpus:
    """Read a corpus.

    ``source`` is one of:

    - ``stdlib`` / ``stdlib:train``: the running interpreter's standard library, train
      split; ``stdlib:calib`` / ``stdlib:eval``: the fixed splits shipped with moekit;
    - ``hf:NAME[:SPLIT]``: a ``datasets`` dataset (needs the package and a reachable hub);
    - a file, a directory (searched recursively) or a glob of ``.txt .py .md .jsonl .parquet``.

    Raises:
        MoekitError: the source does not exist, matches nothing, or holds no text.
    """
    spec = str(source)
    if spec == "stdlib" or spec.startswith("stdlib:"):
        corpus = stdlib_corpus(spec.partition(":")[2] or "train")
    elif spec.startswith("hf:"):
        corpus = _hub_corpus(spec[3:], text_field)
    else:
        corpus = _files_corpus(spec, text_field)
    if not corpus.documents or corpus.num_chars == 0:
        raise MoekitError(
            f"corpus {spec!r} holds no text (skipped: {corpus.skipped or 'nothing'}); "
            "point --data at files with content."
        )
    return corpus


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
        if not matches:
            raise MoekitError(f"the glob {spec!r} matches no file; check the pattern.")
        return [p for p in matches if p.is_file()]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if path.is_file():
        return [path]
    raise MoekitError(f"no such file or directory: {spec!r}; give an existing path, a glob, 'stdlib' or 'hf:NAME'.")


def _files_corpus(spec: str, text_field: str) -> Corpus:
    docs: list[Document] = []
    skipped: dict[str, int] = {}
    root = Path(spec) if Path(spec).is_dir() else None
    # A file named on its own is what the user means to read: refuse it rather than skip it.
    single = Path(spec).expanduser().is_file()
    for path in _expand(spec):
        name = str(path.relative_to(root)) if root else str(path)
        if path.suffix not in SUFFIXES:
            if single:
                raise MoekitError(f"{path}: moekit reads {' '.join(SUFFIXES)} files; convert it or give a folder.")
            skipped["unsupported suffix"] = skipped.get("unsupported suffix", 0) + 1
            continue
        try:
            if path.suffix == ".jsonl":
                docs.extend(_read_jsonl(path, name, text_field))
            elif path.suffix == ".parquet":
                docs.extend(_read_parquet(path, name, text_field))
            else:
                docs.append(Document(name, path.read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            if single:
                raise MoekitError(f"{path} is not UTF-8 text; moekit reads text files as UTF-8 only.") from None
            skipped["not utf-8"] = skipped.get("not utf-8", 0) + 1
    return Corpus([d for d in docs if d.text], source=spec, skipped=skipped)


def _read_jsonl(path: Path, name: str, text_field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(path.read_bytes().decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoekitError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or remove the line.") from None
        if not isinstance(row, dict) or text_field not in row:
            raise MoekitError(f"{path}:{lineno} has no {text_field!r} field; pass --text-field with the right key.")
        if not isinstance(row[text_field], str):
            raise MoekitError(f"{path}:{lineno}: {text_field!r} is not a string; pass --text-field with the text's key.")
        docs.append(Document(f"{name}#{lineno}", row[text_field]))
    return docs


def _read_parquet(path: Path, name: str, text_field: str) -> list[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MoekitError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise MoekitError(f"{path} has no column {text_field!r} (has {schema.names}); pass --text-field.")
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise MoekitError(f"{path}: column {text_field!r} holds {kind}, not text; pass --text-field.")
        # Only the text column: the others (ids, metadata, embeddings) can be most of the file.
        texts = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoekitError(f"{path} is not a readable parquet file ({detail}); write it again.") from None
    return [Document(f"{name}#{i}", t) for i, t in enumerate(texts) if t]


def _hub_corpus(spec: str, text_field: str) -> Corpus:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise MoekitError(f"'hf:{spec}' needs the datasets package: pip install datasets") from None
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # the hub raises many types; all mean the same to the user
        raise MoekitError(
            f"could not load dataset {name!r} from the hub ({type(exc).__name__}: {exc}); "
            "without network access use local files or the built-in 'stdlib' corpus."
        ) from None
    if text_field not in data.column_names:
        raise MoekitError(f"dataset {name!r} has no column {text_field!r} (has {data.column_names}).")
    docs = [Document(f"{name}#{i}", t) for i, t in enumerate(data[text_field]) if t]
    return Corpus(docs, source=f"hf:{spec}")
