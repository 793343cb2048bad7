"""The `moekit` app object the sub-commands register on, and its root options."""

from __future__ import annotations

import typer

from moekit.cli._help import MoekitGroup

app = typer.Typer(
    name="moekit",
    cls=MoekitGroup,  # a flag out of range or unknown: one line, exit 2; help without type names
    help="Make Mixture-of-Experts models smaller and faster; build new ones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import (
            version,  # the installed versions, without importing torch (seconds)
        )

        from moekit.version import installed_version

        typer.echo(f"moekit {installed_version()} (transformers {version('transformers')}, torch {version('torch')})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print moekit's version (and transformers', torch's) and exit."),
) -> None:
    """Make Mixture-of-Experts models smaller and faster; build new ones.

    With no MODEL, every command uses moekit's shipped reference model.
    """


