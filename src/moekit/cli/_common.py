"""What every command shares: user errors as one clean line, JSON output, --threads."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from moekit.errors import MoekitError, WriteFailed

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # keep paths in messages whole


def say(text: str, *, label: str = "", style: str = "", to: Console | None = None) -> None:
    """Print ``text`` exactly as it is. Rich would read any ``[word]`` in it as markup and
    drop it (the extra of ``pip install 'moekit[lmeval]'``, a shape ``[n, H]``, a folder
    ``run[2]``), so nothing moekit prints from its messages, paths or names goes through
    markup: only ``label`` does (moekit's own, e.g. ``"[bold red]error:[/]"``), then a space."""
    line = Text.from_markup(f"{label} ") if label else Text()
    line.append(text, style=style)
    (to or console).print(line, highlight=False)


def error(message: str, *, every_rank: bool = False) -> None:
    """The one line a user error prints: ``error: MESSAGE`` on stderr. Under torchrun every
    rank reaches the same refusal from the same command line and files, so the first rank of
    each node alone prints it: once on one machine, and a problem of one node (a file
    missing there) still reaches the user from that node. ``every_rank``: the message is
    about this rank (joining the group, a write that failed on its disk)."""
    from moekit.torchrun import local_rank

    if every_rank or local_rank() == 0:
        say(message, label="[bold red]error:[/]", to=err_console)


def note(message: str, *, to: Console | None = None) -> None:
    say(message, label="[yellow]note:[/]", to=to)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A MoekitError is the user's problem, not a bug: one red line and exit code 2. A write
    that failed (`moekit.errors.WriteFailed`, or a full disk under a temporary file): one
    line and exit code 74."""
    from moekit.progress import quiet

    try:
        yield
    except MoekitError as exc:
        quiet()  # the error is the last line
        error(str(exc), every_rank=isinstance(exc, WriteFailed))  # a rank's own disk, its own folders
        raise typer.Exit(code=exc.exit_code) from None
    except Exception as exc:
        from moekit.io.outputs import failed_write

        line = failed_write(exc)
        if line is None:
            raise
        quiet()
        error(line, every_rank=True)
        raise typer.Exit(code=WriteFailed.exit_code) from None


def print_json(payload: Any) -> None:
    """Machine-readable output on stdout, and nothing else there; with the threads the
    command chose (`_start_work`), which a terminal user reads on its first line instead."""
    if isinstance(payload, dict) and _chosen:
        payload = {**payload, "threads": _chosen[-1].to_dict()}
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


_chosen: list = []  # the `_threads.Choice` of the command running (in-process callers run several)


def _start_work(ctx: typer.Context, value: Optional[int]) -> Optional[int]:
    """Where every computing command starts its work, as its options are parsed: choose
    torch's CPU threads (`moekit.cli._threads`) and say so in the first line of output;
    from then on, a log file hears from the command at least every few seconds
    (`moekit.progress.heartbeat`: imports, preparation); set the threads while the
    command runs and put them back after it (tests call commands in-process, where a
    setting that outlived the command would leak)."""
    if ctx.resilient_parsing or any(ctx.params.get(flag) for flag in _NO_WORK):
        return value
    with user_errors():
        if value is not None and value < 1:
            raise MoekitError(f"--threads must be at least 1 (got {value}).")
    from moekit.cli._threads import choose
    from moekit.progress import heartbeat, other_rank

    choice = choose(value)
    _chosen.append(choice)
    ctx.call_on_close(lambda: _chosen.remove(choice))
    # --json is eager (parsed before every other option) in every command, so it is known here.
    json_flag = next((p.name for p in ctx.command.params if "--json" in getattr(p, "opts", ())), None)
    if not ctx.params.get(json_flag) and not other_rank():  # under torchrun, rank 0 speaks for all
        err_console.print(f"[dim]{choice.line()}[/]", highlight=False)
        ctx.with_resource(heartbeat(ctx.command_path, console=err_console))
    import torch  # only a command that computes gets here, and it needs torch anyway

    before = torch.get_num_threads()
    torch.set_num_threads(choice.count)
    ctx.call_on_close(lambda: torch.set_num_threads(before))
    return value


# Flags with which a computing command only lists or plans and exits: no threads to choose
# or report. They are eager, like --json, so that they are known when --threads is parsed.
_NO_WORK = ("list_presets", "plan_only", "list_stats")

# Every command that computes declares ``threads: Threads = None``; the callback applies it
# while the arguments are parsed, so no command body has to remember to.
Threads = Annotated[Optional[int], typer.Option(
    "--threads", metavar="N", callback=_start_work,
    help="CPU threads for torch (default: one per core, waiting ones asleep so that other jobs do not stall "
         "them; the first line of output says how many).",
)]
