"""How many CPU threads torch computes with, and how they wait for each other: chosen once
per command, by the ``--threads`` option every computing command declares (`Threads`).

torch's own default is one thread per core, and after every parallel operation its
OpenMP threads spin while they wait for the slowest one. Where another job holds a core,
the thread that lost it is late at every meeting while the others spin on theirs: the
README's first command took 155–260 s (18 min at load 8) instead of 16–20 s with one
thread. With waiting threads asleep at once (``OMP_WAIT_POLICY=PASSIVE``) a busy machine
costs only the CPU that other jobs take: on a shared 2-core machine two such threads were
about as fast as one (BENCHMARKS.md, "CPU threads"), and an idle machine keeps every
core. So moekit keeps one thread per core this process may use (its CPU affinity) and
makes waiting threads sleep. Not fewer threads where the load is high: the load changes
from one second to the next, and a result computed with another number of threads is
rounded differently (sums are split differently), so the same command would give
different checkpoints on a busy and on a quiet machine.

GNU OpenMP reads the wait policy once, when torch loads it: `set_wait_policy` runs before
anything imports torch, and leaves a policy the user set (or ``GOMP_SPINCOUNT``,
``KMP_BLOCKTIME``) alone. ``--threads N`` and ``OMP_NUM_THREADS`` (the user's or a
launcher's: torchrun sets 1) are taken as given.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

WAIT_POLICY = "PASSIVE"
_USER_WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # any of these: the user chose


def set_wait_policy() -> None:
    """Make OpenMP's waiting threads sleep, unless the user chose otherwise or torch (and
    so OpenMP) is loaded already, when it would be too late to have an effect."""
    if "torch" not in sys.modules and not any(name in os.environ for name in _USER_WAIT):
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class Choice:
    """What `choose` decided: the first line of output, or ``threads`` in ``--json``."""

    count: int
    source: str  # "cores", "--threads" or "OMP_NUM_THREADS"
    cores: int
    load: float | None  # the 1-minute load average, for the reader (None where there is none)
    wait_policy: str | None  # OMP_WAIT_POLICY as OpenMP read it

    def line(self) -> str:
        if self.source == "--threads":
            return f"threads: {self.count} (--threads)"
        why = "one per core" if self.source == "cores" else "OMP_NUM_THREADS"
        load = f"load {self.load:.1f} on {self.cores} cores" if self.load is not None else f"{self.cores} cores"
        return f"threads: {self.count} ({why}; {load}; --threads N to override)"

    def to_dict(self) -> dict:
        return asdict(self)


def choose(requested: int | None) -> Choice:
    cores = usable_cores()
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # none on Windows
        load = None
    policy = os.environ.get("OMP_WAIT_POLICY")
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if requested is not None:
        return Choice(requested, "--threads", cores, load, policy)
    if omp.isdigit() and int(omp) > 0:
        return Choice(int(omp), "OMP_NUM_THREADS", cores, load, policy)
    return Choice(cores, "cores", cores, load, policy)
