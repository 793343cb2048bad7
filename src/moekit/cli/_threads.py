"""How many CPU threads torch computes with, chosen once per command: the ``--threads``
option every computing command declares (`Threads`).

torch's default, one thread per core, is fastest only on a machine nobody else uses. Its
OpenMP threads meet after every operation, and the one that finished first waits for the
others; where another job holds a core, the thread that lost it is late at every meeting,
and the README's first command took 155–260 s instead of 16–20 s on one thread. The
default here is therefore the cores this process may use (its CPU affinity) minus the
cores other jobs kept busy while the command started, at least one. That is measured from
/proc/stat over the seconds between importing the command line and choosing (mostly
``import torch``): the busy time of those cores, less this process's own. Without
/proc/stat (macOS), the 1-minute load average stands in for it.

OpenMP's waiting threads also sleep at once instead of spinning for a while
(``OMP_WAIT_POLICY=PASSIVE``), so that a thread that is waiting never holds a core that
a late one needs, should other jobs start after the choice. GNU OpenMP reads that
variable once, when torch loads it, so it is set when the command line is imported,
before torch is, and only where the user set no wait policy of their own.
``--threads N`` and ``OMP_NUM_THREADS`` (a launcher's or the user's) are taken as given.
BENCHMARKS.md ("CPU threads") has the measurements this rule comes from.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

WAIT_POLICY = "PASSIVE"
_USER_WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # any of these: the user chose


def set_wait_policy() -> None:
    """Before torch is imported (after, OpenMP has read its environment already)."""
    if not any(name in os.environ for name in _USER_WAIT):
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, int, int, float, int] | None:
    """(now, busy jiffies, all jiffies of the cores this process may use, this process's CPU
    seconds, its id); None without /proc/stat."""
    try:
        lines = open("/proc/stat").read().splitlines()  # noqa: SIM115 - one small read
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (OSError, AttributeError):
        return None
    busy = total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in mine:
            # user nice system idle iowait irq softirq steal: idle and iowait are free time
            counts = [int(v) for v in fields[1:9]]
            total += sum(counts)
            busy += sum(counts) - counts[3] - counts[4]
    own = os.times()
    return time.monotonic(), busy, total, own.user + own.system, os.getpid()


_START = _cpu_times()  # taken when the command line is imported: the start of the measured seconds
_MIN_SECONDS = 0.3  # fewer clock ticks than this (100 a second) say little


def others_load() -> float:
    """How many cores' worth of CPU other processes used lately (see the module docstring)."""
    start = _START
    if start is None:
        return min(os.getloadavg()[0], float(usable_cores()))
    if start[4] != os.getpid():  # a forked child: its own CPU seconds started again from zero
        start = _cpu_times()
    if time.monotonic() - start[0] < _MIN_SECONDS:  # torch was imported before the command line
        time.sleep(_MIN_SECONDS - (time.monotonic() - start[0]))
    end = _cpu_times()
    tick = os.sysconf("SC_CLK_TCK")
    spans = (end[2] - start[2]) / usable_cores()  # jiffies that passed on each core
    others = (end[1] - start[1]) / tick - (end[3] - start[3])
    return max(0.0, others / (spans / tick)) if spans > 0 else 0.0


@dataclass
class Choice:
    """What `choose` decided, for the first line of output and for ``--json``."""

    count: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "load"
    cores: int
    others_load: float | None = None
    wait_policy: str | None = None

    def line(self) -> str:
        if self.source == "--threads":
            why = "--threads"
        elif self.source == "OMP_NUM_THREADS":
            why = "OMP_NUM_THREADS; --threads N to override"
        else:
            why = f"other jobs use {self.others_load:.1f} of {self.cores} cores; --threads N to override"
        return f"threads: {self.count} ({why})"

    def to_dict(self) -> dict:
        return asdict(self)


def choose(requested: int | None) -> Choice:
    cores = usable_cores()
    policy = os.environ.get("OMP_WAIT_POLICY")
    if requested is not None:
        return Choice(requested, "--threads", cores, wait_policy=policy)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return Choice(int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS", cores, wait_policy=policy)
    load = others_load()
    threads = max(1, min(cores, int(cores - load + 0.5)))
    return Choice(threads, "load", cores, round(load, 2), policy)
