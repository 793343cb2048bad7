"""moekit's version, as installed: pyproject.toml's, one source of truth."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def installed_version() -> str:
    """Read on first use: importlib.metadata is a noticeable part of the CLI's start-up."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moekit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
