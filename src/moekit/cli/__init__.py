"""The `moekit` command: one module per sub-command, each a thin layer over the API."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="moekit",
    help="Make Mixture-of-Experts models smaller and faster; build new ones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        import torch
        import transformers

        from moekit import __version__

        typer.echo(f"moekit {__version__} (transformers {transformers.__version__}, torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print moekit's version (and transformers', torch's) and exit."),
) -> None:
    """Make Mixture-of-Experts models smaller and faster; build new ones.

    With no MODEL, every command uses moekit's shipped reference model.
    """


# Sub-commands register themselves on `app` when imported.
from moekit.cli import calibrate as _calibrate  # noqa: E402,F401
from moekit.cli import compress as _compress  # noqa: E402,F401
from moekit.cli import eval as _eval  # noqa: E402,F401
from moekit.cli import inspect as _inspect  # noqa: E402,F401
from moekit.cli import train as _train  # noqa: E402,F401


def main() -> None:
    app()
