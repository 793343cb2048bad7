"""The one exception type users see: a message that names the problem and the fix."""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C: what shells report (128 + SIGINT)


class MoekitError(Exception):
    """A problem with the user's input, reported before any heavy work starts.

    The message always says what is wrong and what to do instead; the CLI prints it
    without a traceback and exits with ``exit_code``.
    """

    exit_code = 2  # bad input: what shells and argument parsers use for a usage error


class WriteFailed(MoekitError):
    """Writing an output failed while the work ran (the disk filled up, a file outgrew the
    size limit, the file system turned read-only): the input was fine. The message says
    what failed, what was removed or kept, and the fix (`moekit.io.workdir.writing`)."""

    exit_code = 74  # sysexits' EX_IOERR; 1 is what Python exits with on a bug's traceback

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix
        self.notes: list[str] = []  # what was removed or kept, added as the failure unwinds

    def __str__(self) -> str:
        return " ".join([self.problem, *self.notes, self.fix])


class UnsupportedModelError(MoekitError):
    """The model is not an MoE family moekit knows, or has no routed-expert layers."""


# Whether messages are being built for the command line (set by `moekit.cli` while a command
# runs): one message serves both, naming the setting as its reader wrote it.
_FOR_COMMAND_LINE = contextvars.ContextVar("moekit_for_command_line", default=False)
_NO_VALUE = object()


def setting(name: str, value: Any = _NO_VALUE, *, flag: str | None = None) -> str:
    """A setting named the way the user gave it: the Python parameter (``slow_tier`` or
    ``slow_tier='memory'``) from the API, the flag (``--slow-tier`` or ``--slow-tier memory``;
    ``flag`` where it is not the parameter's name with dashes) from the command line."""
    if _FOR_COMMAND_LINE.get():
        flag = flag or "--" + name.replace("_", "-")
        return flag if value is _NO_VALUE else f"{flag} {value}"
    return name if value is _NO_VALUE else f"{name}={value!r}"


@contextlib.contextmanager
def command_line_messages() -> Iterator[None]:
    """While inside, `setting` names flags: what `moekit.cli` runs every command in."""
    token = _FOR_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _FOR_COMMAND_LINE.reset(token)


def validation_problems(exc: ValidationError, *, default_field: str = "") -> str:
    """pydantic's errors as one line: ``field: what is wrong (got value)``, joined by "; "."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or default_field
        got = ""
        # A whole-model error's input is the mapping itself, and a missing field has none.
        if err.get("type") != "missing" and not isinstance(err.get("input"), dict):
            value = repr(err["input"])
            got = f" (got {value if len(value) <= 60 else value[:57] + '...'})"
        problems.append(f"{where}: {err['msg']}{got}")
    return "; ".join(problems)


def read_json(file: Path, *, fix: str) -> Any:
    """The JSON in ``file``, or a one-line `MoekitError` naming it, where it broke, and
    ``fix`` (what to do about it)."""
    try:
        return json.loads(_utf8(file, "JSON", fix))
    except json.JSONDecodeError as exc:
        raise MoekitError(f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); {fix}") from None


def read_yaml(file: Path, *, fix: str) -> Any:
    """The YAML in ``file``, or a one-line `MoekitError` as for `read_json`."""
    import yaml

    try:
        return yaml.safe_load(_utf8(file, "YAML", fix))
    except yaml.YAMLError as exc:
        raise MoekitError(f"{file} is not valid YAML ({yaml_problem(exc)}); {fix}") from None


def yaml_problem(exc: Exception) -> str:
    """A YAML parser error in one line: where and what (its own message spans several,
    quoting the offending lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(exc, "problem", None) or exc).split())


def _utf8(file: Path, kind: str, fix: str) -> str:
    try:
        return Path(file).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise MoekitError(f"{file} is not UTF-8 text, so not {kind}; {fix}") from None
