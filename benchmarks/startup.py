"""How long `moekit --help` and `moekit --version` take, as a ratio to `python -c "import
torch"` on the same machine in the same run (the goal is at most 1.5). Each of the three
runs RUNS times, interleaved so that a busy stretch of the machine hits all of them alike,
in fresh processes; the medians are reported.

    python benchmarks/startup.py > benchmarks/results/startup.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

RUNS = 5


def moekit_command() -> list[str]:
    """The console script users run, next to this interpreter (else ``-m moekit``)."""
    script = Path(sys.executable).with_name("moekit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "moekit"]


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True)
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def main() -> None:
    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "moekit --help": [*moekit_command(), "--help"],
        "moekit --version": [*moekit_command(), "--version"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(RUNS):
        for name, command in commands.items():
            times[name].append(seconds(command))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": str(date.today()),
        "commit": commit(),
        "runs": RUNS,
        "median_seconds": {name: round(value, 3) for name, value in median.items()},
        "ratio_to_import_torch": {name: round(median[name] / median["import torch"], 3)
                                  for name in commands if name != "import torch"},
        "all_seconds": {name: [round(v, 3) for v in values] for name, values in times.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
