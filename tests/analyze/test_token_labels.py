"""tokens.png names the most frequent tokens on its y axis: code's tokens are often
whitespace (a newline and an indent), which must read as such on one line, and a token's
``$`` is a character, not the start of a formula."""

from __future__ import annotations

from moekit.analyze.figures import _label, tokens


def test_whitespace_is_visible_and_on_one_line():
    assert _label({"id": 262, "text": "\n    "}) == "'↵␣␣␣␣'"
    assert _label({"id": 200, "text": "\t"}) == "'→'"
    assert _label({"id": 202, "text": "\x0b"}) == "'\\x0b'"
    assert _label({"id": 62, "text": "a\\n"}) == "'a\\n'"  # a backslash and an n: not a newline
    assert _label({"id": 7, "text": None}) == "7"


def test_dollar_signs_are_drawn_as_text():
    """Two of them made matplotlib read the label as mathtext, which failed to draw."""
    frequent = [{"id": 1, "text": "$\\x$", "concentration": 0.5}, {"id": 2, "text": "\n", "concentration": 0.2}]
    layers = [{"layer": i, "tokens": {"lookup_agreement": 0.5, "static_agreement": 0.3, "mean_concentration": 0.4,
                                      "uniform_concentration": 0.25, "frequent": frequent}} for i in range(2)]
    assert tokens(layers, "t").startswith(b"\x89PNG")
