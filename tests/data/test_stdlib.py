"""The stdlib corpus: a stable split by path, shipped fixed splits with verified hashes."""

import hashlib
import json

from moekit.data import load_corpus, split_of
from moekit.data.shipped import SHIPPED_DIR, read_shipped, write_shipped
from moekit.data.stdlib import scan_stdlib, split_sha256


def test_split_is_a_fixed_function_of_the_path():
    # Pinned: changing the rule would silently move files between train and eval.
    assert split_of("test/datetimetester.py") == "eval"
    assert split_of("mailbox.py") == "eval"
    assert split_of("random.py") == "calib"
    assert split_of("json/decoder.py") == "train"
    assert split_of("typing.py") == "train"


def test_split_fractions_are_small_held_out_sets():
    names = [f"pkg{i}/mod{j}.py" for i in range(50) for j in range(40)]
    counts = {s: sum(split_of(n) == s for n in names) for s in ("train", "calib", "eval")}
    assert 0.01 < counts["eval"] / len(names) < 0.03
    assert 0.01 < counts["calib"] / len(names) < 0.03


def test_shipped_splits_match_their_manifest():
    manifest = json.loads((SHIPPED_DIR / "manifest.json").read_text())
    for split in ("calib", "eval"):
        docs = read_shipped(split)
        entry = manifest["splits"][split]
        assert split_sha256(docs) == entry["sha256"]
        assert [d.name for d in docs] == [f["path"] for f in entry["files"]]
        assert all(split_of(d.name) == split for d in docs)
        for doc, f in zip(docs, entry["files"]):
            assert hashlib.sha256(doc.text.encode()).hexdigest() == f["sha256"]
    total = sum(p.stat().st_size for p in SHIPPED_DIR.iterdir())
    assert total < 2_000_000


def test_train_split_never_contains_a_shipped_path():
    train = load_corpus("stdlib")
    held = {d.name for s in ("calib", "eval") for d in read_shipped(s)}
    names = {d.name for d in train.documents}
    assert names and not names & held
    assert all(split_of(n) == "train" for n in names)
    assert train.num_chars > 1_000_000


def test_scan_skips_non_utf8_and_write_is_reproducible(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "mailbox.py").write_text("x = 1\n")  # an eval path
    (root / "random.py").write_text("y = 2\n")  # a calib path
    (root / "latin.py").write_bytes("s = 'café'\n".encode("latin-1"))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "mailbox.py").write_text("not stdlib")
    splits, not_utf8 = scan_stdlib(root)
    assert not_utf8 == 1
    assert [d.name for d in splits["eval"]] == ["mailbox.py"]
    first = write_shipped(tmp_path / "a", root)
    second = write_shipped(tmp_path / "b", root)
    assert first["splits"] == second["splits"]
    assert [d.text for d in read_shipped("calib", tmp_path / "a")] == ["y = 2\n"]
