"""Whether this process is one of several ranks a launcher (torchrun, Slurm + torchrun)
started, and which one on its node: read from the environment alone, so that the CLI can
ask before it imports torch (`moekit --help` must stay fast; `moekit.distributed` imports
torch.distributed)."""

from __future__ import annotations

import os


def launched() -> bool:
    """True in a process a launcher started as one of several ranks (``WORLD_SIZE`` > 1)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1



def local_rank() -> int:
    """This process's rank on its node in a launch (0 outside one)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0
