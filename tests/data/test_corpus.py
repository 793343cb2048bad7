"""Corpus readers: every supported file kind, non-UTF-8 skipping, clear errors."""

import json

import pytest

from moekit.data import load_corpus
from moekit.errors import MoekitError


def test_reads_text_code_markdown_and_jsonl_from_a_directory(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("def f():\n    return 1\n")
    (tmp_path / "c.md").write_text("# title")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    corpus = load_corpus(tmp_path)
    assert sorted(d.text for d in corpus.documents) == sorted(
        ["plain text", "def f():\n    return 1\n", "# title", "row one", "row two"]
    )
    assert "sub/b.py" in {d.name for d in corpus.documents}


def test_glob_and_single_file(tmp_path):
    for i in range(3):
        (tmp_path / f"f{i}.py").write_text(f"x = {i}\n")
    assert len(load_corpus(str(tmp_path / "f*.py"))) == 3
    assert load_corpus(tmp_path / "f1.py").documents[0].text == "x = 1\n"


def test_non_utf8_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("ok")
    (tmp_path / "bad.txt").write_bytes("café".encode("latin-1"))
    corpus = load_corpus(tmp_path)
    assert [d.text for d in corpus.documents] == ["ok"]
    assert corpus.skipped == {"not utf-8": 1}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "no such file"),
        (lambda p: str(p / "*.nothing"), "matches no file"),
        (lambda p: (p / "empty.txt").write_text("") and p / "empty.txt" or p / "empty.txt", "holds no text"),
    ],
)
def test_bad_sources_fail_clearly(tmp_path, make, message):
    with pytest.raises(MoekitError, match=message):
        load_corpus(make(tmp_path))


def test_jsonl_without_the_text_field_names_the_fix(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(MoekitError, match="text-field"):
        load_corpus(tmp_path / "rows.jsonl")
    assert load_corpus(tmp_path / "rows.jsonl", text_field="content").documents[0].text == "x"


def test_parquet_reads_its_text_column_and_names_the_fix_when_missing(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": [1, 2, 3], "content": ["first row", "", "third row"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    with pytest.raises(MoekitError, match=r"no column 'text' \(has \['id', 'content'\]\); pass --text-field"):
        load_corpus(tmp_path / "rows.parquet")
    corpus = load_corpus(tmp_path, text_field="content")
    assert [(d.name, d.text) for d in corpus.documents] == [("rows.parquet#0", "first row"), ("rows.parquet#2", "third row")]


def test_hub_names_fail_clearly_without_the_hub():
    with pytest.raises(MoekitError, match="datasets|could not load"):
        load_corpus("hf:some/dataset-that-is-not-here")


def test_a_file_named_on_its_own_is_refused_not_skipped(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "table.csv").write_text("text\nx\n")
    with pytest.raises(MoekitError, match=r"latin1.txt is not UTF-8 text"):
        load_corpus(tmp_path / "latin1.txt")
    with pytest.raises(MoekitError, match=r"table.csv: moekit reads .txt .py .md .jsonl .parquet files"):
        load_corpus(tmp_path / "table.csv")


def test_jsonl_text_that_is_not_a_string_is_refused(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(MoekitError, match=r"rows.jsonl:2: 'text' is not a string"):
        load_corpus(tmp_path / "rows.jsonl")


def test_parquet_that_is_corrupt_or_has_no_text_column_is_named(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a row"] * 50, "n": list(range(50))}), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    for name in ("truncated.parquet", "garbage.parquet"):
        with pytest.raises(MoekitError, match=rf"{name} is not a readable parquet file \(.+\); write it again"):
            load_corpus(tmp_path / name)
    with pytest.raises(MoekitError, match=r"good.parquet: column 'n' holds int64, not text"):
        load_corpus(tmp_path / "good.parquet", text_field="n")
