"""The transformers versions moekit runs on.

moekit reads and writes checkpoints through transformers' own weight conversion
(``transformers.core_model_loading``, ``conversion_mapping``, the fused-experts functions
of ``integrations.moe``), which are private and change between 5.x releases: an older or
newer release fails deep inside them, or, worse, loads something else. So the range
pyproject.toml states (the one `scripts/check_transformers_range.sh` tests at both ends) is
checked once, before the first model is built, and a version outside it is refused in one
line. The range is read from the installed package's metadata: one source of truth. A
source tree that was never installed states none and is not checked.
"""

from __future__ import annotations

import functools
import os

from moekit.errors import MoekitError

ANY_VERSION = "MOEKIT_ANY_TRANSFORMERS"  # set to 1: run on an untested transformers anyway


def refusal(installed: str, required: str) -> str | None:
    """The one-line refusal of transformers ``installed`` under the requirement
    ``required`` (``transformers>=5.23,<5.26``), or None when it is inside."""
    from packaging.requirements import Requirement

    specifier = Requirement(required).specifier
    if specifier.contains(installed, prereleases=True):
        return None
    return (f"transformers {installed} is installed, but moekit supports transformers{specifier} only (it uses "
            f"transformers' private checkpoint-loading code, which changes between releases): "
            f"pip install 'transformers{specifier}' (or set {ANY_VERSION}=1 to run on it untested).")


@functools.cache
def check_transformers() -> None:
    """Raise `MoekitError` when the installed transformers is outside moekit's range."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    if os.environ.get(ANY_VERSION) == "1":
        return
    try:
        stated = [r for r in requires("moekit") or () if Requirement(r).name == "transformers"
                  and Requirement(r).marker is None]
    except PackageNotFoundError:
        return
    if stated:
        message = refusal(version("transformers"), stated[0])
        if message is not None:
            raise MoekitError(message)
