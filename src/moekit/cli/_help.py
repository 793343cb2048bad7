"""How `moekit --help` and every command's help read, set in one place: moekit's command
group tidies each command as it is looked up.

- A value's placeholder is a word (TEXT, INTEGER, PATH, or the option's own, such as SIZE)
  and a flag has none: typer >= 0.26 shows each parameter's Python type instead (``<str>``,
  and ``<bool>`` after every flag, ``--help`` included).
- The list of commands shows each command's first docstring paragraph as one paragraph,
  wrapped to the terminal: typer keeps the docstring's own line breaks there, which leaves
  ragged lines (the command's own help already joins them).
"""

from __future__ import annotations

import inspect
from typing import Any

from moekit.cli._options import OneLineUsage

_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH", "bool": "BOOLEAN"}


def _word(annotation: Any) -> str:
    """TEXT for ``str``, ``list[str]`` and ``Optional[str]``; INTEGER, FLOAT, PATH likewise."""
    for arg in (annotation, *getattr(annotation, "__args__", ())):
        name = getattr(arg, "__name__", None)
        if name in _WORDS:
            return _WORDS[name]
    return "VALUE"


def _tidy_parameter(param: Any) -> None:
    if param.metavar is not None:  # declared where the option is (N, SIZE, FOLDER)
        return
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        param.metavar = ""  # what click shows after a flag: nothing
        return
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:
        return  # typer < 0.26: click's own placeholders (TEXT, INTEGER) are shown already
    if param.param_type_name == "argument":
        param.metavar = param.name.upper()
        param.__class__ = _argument_class(type(param))
    else:
        param.metavar = _word(descriptor.annotation)


_ARGUMENT_CLASSES: dict[type, type] = {}


def _argument_class(cls: type) -> type:
    """``cls`` without the type column typer >= 0.26 adds to an argument's row (``MODEL <str>``):
    it shows no metavar there, so an argument reads as its name alone, like click's."""
    if cls not in _ARGUMENT_CLASSES:
        _ARGUMENT_CLASSES[cls] = type(cls.__name__, (cls,), {"display_type_rich": lambda self, ctx: None})
    return _ARGUMENT_CLASSES[cls]


def _tidy(command: Any, ctx: Any) -> None:
    if command.short_help is None and command.help:
        first = inspect.cleandoc(command.help).partition("\f")[0].split("\n\n")[0]
        command.short_help = " ".join(first.split())
    for param in command.params:
        _tidy_parameter(param)
    help_option = command.get_help_option(ctx)
    if help_option is not None:
        _tidy_parameter(help_option)


class MoekitGroup(OneLineUsage):
    """The `moekit` command group: one-line usage errors (`OneLineUsage`) and tidy help."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _tidy(command, ctx)
        return command

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _tidy_parameter(option)
        return option

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:  # the group's own options (--version)
            _tidy_parameter(param)
        super().format_help(ctx, formatter)
