"""What every command shares: user errors as one clean line, JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console

from moekit.errors import MoekitError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # keep paths in messages whole


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A MoekitError is the user's problem, not a bug: one red line and exit code 2."""
    try:
        yield
    except MoekitError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2) from None


def print_json(payload: Any) -> None:
    """Machine-readable output on stdout, and nothing else there."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
