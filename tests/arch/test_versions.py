"""moekit states the transformers range it is tested on, runs its suite inside it, and
refuses a version outside it in one line."""

import re
from importlib.metadata import version
from pathlib import Path

from moekit.arch.versions import ANY_VERSION, refusal

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _stated() -> str:
    (transformers,) = re.findall(r'^\s*"(transformers[<>=~!].*?)",', PYPROJECT.read_text(), flags=re.M)
    return transformers


def test_the_suite_runs_on_a_transformers_pyproject_allows():
    assert refusal(version("transformers"), _stated()) is None


def test_a_transformers_outside_the_range_is_refused_with_the_fix():
    required = "transformers>=5.23,<5.26"
    assert refusal("5.23.0", required) is None and refusal("5.25.0", required) is None
    for outside in ("5.22.2", "5.26.0", "6.0.0"):
        message = refusal(outside, required)
        assert message.startswith(f"transformers {outside} is installed, but moekit supports transformers")
        assert "pip install 'transformers<5.26,>=5.23'" in message and f"{ANY_VERSION}=1" in message
