"""The `moekit` command: one module per sub-command, each a thin layer over the API,
registered on the app (`moekit.cli.app`) when this package gathers them."""

from __future__ import annotations

import os
import signal
import sys
import threading

from moekit.errors import INTERRUPTED


def _interrupted(*_: object) -> None:
    """Ctrl-C, wherever it lands (an import, data preparation, work): one line and exit
    130. SystemExit still unwinds every ``with``/``finally`` (temporary folders are
    removed) but prints no traceback, even when raised while modules are being imported."""
    progress = sys.modules.get("moekit.progress")
    if progress is not None:
        progress.quiet()  # no progress line after this one
    os.write(2, b"interrupted\n")  # unbuffered: the handler may run in the middle of a write to stderr
    raise SystemExit(INTERRUPTED)


def _exit_on_interrupt() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False  # only the main thread may set handlers (moekit.cli imported in a worker)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return False  # started to ignore Ctrl-C (a shell script's background job): keep ignoring it
    signal.signal(signal.SIGINT, _interrupted)
    return True


# Start-up is mostly imports: cover them from here, and give the handler back afterwards
# so that a program importing moekit.cli (the tests) keeps its own.
_previous = signal.getsignal(signal.SIGINT)
_handled_imports = _exit_on_interrupt()

from moekit.cli.app import app  # noqa: E402,F401  (the face gathers the commands on it)

# Sub-commands register themselves on `app` when imported.
from moekit.cli import analyze as _analyze  # noqa: E402,F401
from moekit.cli import calibrate as _calibrate  # noqa: E402,F401
from moekit.cli import combine as _combine  # noqa: E402,F401
from moekit.cli import compress as _compress  # noqa: E402,F401
from moekit.cli import eval as _eval  # noqa: E402,F401
from moekit.cli import inspect as _inspect  # noqa: E402,F401
from moekit.cli import run as _run  # noqa: E402,F401
from moekit.cli import split as _split  # noqa: E402,F401
from moekit.cli import train as _train  # noqa: E402,F401
from moekit.cli import upcycle as _upcycle  # noqa: E402,F401

if _handled_imports and _previous is not None:  # None: set outside Python, cannot be put back
    signal.signal(signal.SIGINT, _previous)


def entry() -> None:
    """The `moekit` console script and ``python -m moekit``: `main`, then the process ends
    without the interpreter's teardown (`_exit`). Code that runs the command inside a process
    of its own (tests, a torch.multiprocessing rank) calls `main`, which raises SystemExit."""
    main(hard_exit=True)


def main(*, hard_exit: bool = False) -> None:
    _exit_on_interrupt()  # a command that wants Ctrl-C itself (train's checkpoint) sets its own, then restores this
    from moekit.cli._distributed import join_ranks
    from moekit.cli._threads import set_wait_policy

    set_wait_policy()  # before anything imports torch (join_ranks may): OpenMP reads it once, when torch loads it

    join_ranks()  # under torchrun: one of several ranks (moekit.distributed)
    try:
        app()
    except SystemExit as exc:  # how every command ends, typer's standalone mode included
        if not hard_exit or "torch" not in sys.modules:  # --help, --version, a usage error: the usual teardown
            raise
        _exit(exc.code)


def _exit(code: object) -> None:
    """End the process once the command is done without the interpreter's teardown of
    every module (torch's, transformers'): seconds of silence after the last line of
    output, 2-12 s measured on a busy 2-core machine. What a normal exit does that matters
    still happens: atexit's handlers (temporary folders, the torchrun group, logging)
    run and the output is flushed. Threads still running (an offload prefetch) end."""
    import atexit

    if code is not None and not isinstance(code, int):  # SystemExit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`moekit ... | head`) or stream
            pass
    os._exit(code or 0)
