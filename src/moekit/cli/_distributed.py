"""`torchrun ... -m moekit COMMAND`: every rank joins the group before the command runs.

The command itself is the same on every rank (the API shares the rows out and combines
the statistics, `moekit.distributed`); rank 0 alone prints on stdout and draws progress,
so a launch prints one report, not one per rank. A refusal, which every rank reaches, is
printed by the first rank of each node (`moekit.cli._common.error`): once on one
machine, and a problem of one node (a missing file) still reaches the user from it. Every
rank exits with the refusal's code (2); torchrun then prints its own failure summary (a
traceback of its ChildFailedError, listing each rank's exit code) and exits 1: that is the
launcher's, and no exit code of the ranks avoids it.
"""

from __future__ import annotations

import atexit
import os
import sys

from moekit.cli._common import error


RANKED = {"calibrate", "compress", "eval"}  # the commands that share rows out and combine statistics


def join_ranks() -> None:
    """Join the torchrun group, when this process is one of its ranks (exit 2 with one line
    when the rendezvous fails: a wrong MASTER_ADDR, a port in use, a rank that never came)."""
    from moekit.torchrun import launched

    if not launched():  # before importing torch.distributed: every command starts here
        return
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command is not None and command not in RANKED:
        error(f"moekit {command} does not share its work across ranks (only {', '.join(sorted(RANKED))} do); "
              "run it without torchrun.")
        raise SystemExit(2)  # on every rank, before any rendezvous: no rank waits for another
    from moekit.distributed import world as group
    from moekit.errors import MoekitError

    try:
        world = group.init()
    except (MoekitError, RuntimeError, ValueError) as exc:
        error(f"rank {os.environ.get('RANK')}: could not join the torchrun group "
              f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); check "
              "MASTER_ADDR/MASTER_PORT (--rdzv-endpoint) and that every rank was started.", every_rank=True)
        raise SystemExit(2) from None
    atexit.register(group.finish)
    if world is not None and not world.main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
