"""Regenerate the tokenizer the tiny models share (maintainers only).

Run:  python scripts/make_tiny_tokenizer.py
"""

from moekit.zoo.tiny import make_tiny_tokenizer

if __name__ == "__main__":
    print(f"wrote {make_tiny_tokenizer()}")
