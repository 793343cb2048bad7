"""Option values are checked while the command line is parsed, before any work starts,
and a bad one is refused in one line naming the flag, with exit code 2.

Ranges are declared on the options themselves: typer's ``min=``/``max=`` for integers,
`real` for floats (it also refuses nan and inf, which typer's bounds let through or
cannot express). typer reports a bad value, like an unknown option, as a usage block of
several lines; `OneLineUsage`, the class of moekit's command group, prints it as one
line instead, like every other user error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import typer
from typer.core import TyperGroup

SEED_MAX = 2**32 - 1  # the widest seed every library moekit seeds (numpy's) accepts

# typer >= 0.26 carries its own copy of click; its UsageError is BadParameter's base either way.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    try:
        yield
    except _USAGE_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise  # `moekit` alone: its "error" is the help, which must stay whole
        from moekit.cli._common import error

        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error(f"{exc.format_message()}{hint}")
        raise typer.Exit(code=2) from None


class OneLineUsage(TyperGroup):
    """moekit's command group: usage errors of the group and of every command in one line.
    A command's options are parsed inside the group's ``invoke``, so both hooks are needed."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        from moekit.errors import command_line_messages  # errors name flags, not parameters

        with _one_line(), command_line_messages():
            return super().invoke(ctx)


def real(low: float, *, above: bool = False) -> Callable[[Any], float]:
    """A parser for a finite float at least ``low`` (greater than it if ``above``): an
    infinite learning rate or loss weight fails only steps later, as nan losses."""
    bound = f"{'greater than' if above else 'at least'} {low:g}"

    def parse(value: Any) -> float:
        try:
            number = float(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a number.") from None
        if not math.isfinite(number) or number < low or (above and number == low):
            raise typer.BadParameter(f"must be a finite number {bound} (got {value}).")
        return number

    return parse


def within_positions(model: str | None, flag: str, length: int) -> None:
    """Refuse a sequence length the model has no positions for, naming the flag that set
    it, from the config alone: before any data is read (the same check deeper down names
    the API's parameter, and runs after tokenizing)."""
    from moekit.errors import MoekitError
    from moekit.io.load import default_model, load_config

    positions = getattr(load_config(model), "max_position_embeddings", None)
    if positions and length > positions:
        raise MoekitError(f"{flag} {length} is beyond the {positions} positions of {model or default_model()}; "
                          f"use at most {positions}.")
