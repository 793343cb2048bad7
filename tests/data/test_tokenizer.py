"""Byte-level BPE: exact round trips, special tokens, standard HF loading."""

from transformers import AutoTokenizer

from moekit.data import load_tokenizer, save_tokenizer, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "# comment with unicode: naïve café ünïcödé → λ\n",
] * 20


def test_round_trip_is_exact_even_for_unseen_text(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=320)
    for text in TEXTS[:3] + ["\t\tweird   spacing  ,x\r\n", "emoji 🐍 and 中文", ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok) <= 320
    assert len(tok(TEXTS[0], add_special_tokens=False)["input_ids"]) < len(TEXTS[0].encode())


def test_special_tokens_and_standard_loading(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    save_tokenizer(tok, tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)  # plain transformers, no moekit
    text = TEXTS[1]
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert load_tokenizer(tmp_path).eos_token == "<|eos|>"


def test_training_is_deterministic():
    a = train_tokenizer(TEXTS, vocab_size=300)
    b = train_tokenizer(TEXTS, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()


def test_a_corrupt_tokenizer_file_is_named(tmp_path):
    import pytest

    from moekit.errors import MoekitError

    save_tokenizer(train_tokenizer(TEXTS, vocab_size=300), tmp_path)
    good = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(good[: len(good) // 2])
    with pytest.raises(MoekitError, match=r"tokenizer.json is not valid JSON \(line \d+, column \d+"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "nothing-known"}}')
    with pytest.raises(MoekitError, match=r"tokenizer.json is not a tokenizer transformers can read"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(good)
    (tmp_path / "tokenizer_config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(MoekitError, match=r"tokenizer_config.json is not UTF-8 text"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_is_named_by_folder_or_by_model():
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.load import ZOO_DIR

    fine = tokenizer_for("moekit/tiny-mixtral", "moekit/ref-fine")  # the name, not a folder of that name
    assert fine.get_vocab() == load_tokenizer(ZOO_DIR / "ref-fine").get_vocab()
    assert tokenizer_for("moekit/tiny-mixtral", ZOO_DIR / "ref-fine").get_vocab() == fine.get_vocab()
    assert len(tokenizer_for("moekit/tiny-olmoe")) == len(tokenizer_for("x", "moekit/tiny-mixtral")) == 384
