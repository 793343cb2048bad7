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
