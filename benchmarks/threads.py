"""How long the README's first command takes, `moekit compress --recipe prune-50 -o OUT
--eval` (or another: ``--command``), under each choice of CPU threads and OpenMP wait
policy, with the machine as it is ("idle") and with one more job spinning on one core
(``python -c 'while 1: pass'``, the other job of the README's claim): "busy" starts it in
this session, as ``&`` in the same shell does; "apart" in a session of its own, as a job
started from another terminal does (Linux's autogroups then share the CPU between the two
sessions, not between threads). Each configuration runs in a fresh process in a fresh
folder; configurations are interleaved, so a busy stretch of a shared machine hits all of
them alike. The load average is recorded before each run and sampled during it (every
2 s), as other users of the machine change it.

    python benchmarks/threads.py --configs default,t1,t2-spin,t2-passive --repeats 2 > threads.json
    python benchmarks/threads.py --command "calibrate -o stats" --conditions idle > calibrate.json

A configuration is ``NAME`` from CONFIGS: extra arguments and environment for the command.
The first line of stderr is recorded where it is moekit's `threads:` line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date

from startup import commit, moekit_command  # the same console script and commit facts

README_FIRST = ["compress", "--recipe", "prune-50", "-o", "pruned-ref-fine", "--eval"]

# name: (extra arguments, environment set for the command; None removes the variable)
CONFIGS: dict[str, tuple[list[str], dict[str, str | None]]] = {
    "default": ([], {}),  # what a new user runs: moekit's own choice
    "t1": (["--threads", "1"], {}),
    "t2": (["--threads", "2"], {}),
    # libgomp's own defaults before moekit chose a policy: spin 300,000 rounds before sleeping
    "t2-spin": (["--threads", "2"], {"GOMP_SPINCOUNT": "300000"}),
    "t2-active": (["--threads", "2"], {"OMP_WAIT_POLICY": "ACTIVE"}),  # spin until the work comes
    "t2-passive": (["--threads", "2"], {"OMP_WAIT_POLICY": "PASSIVE"}),  # sleep at once
    "t2-spin10k": (["--threads", "2"], {"GOMP_SPINCOUNT": "10000"}),  # spin a thirtieth as long, then sleep
}
SCRUB = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def load_sampler(samples: list[float], stop: threading.Event) -> None:
    while not stop.wait(2.0):
        samples.append(os.getloadavg()[0])


def one_run(command: list[str], name: str, condition: str, timeout: float) -> dict:
    args, extra = CONFIGS[name]
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update({k: v for k, v in extra.items() if v is not None})
    spinner = None if condition == "idle" else subprocess.Popen([sys.executable, "-c", "while 1: pass"],
                                                                 start_new_session=condition == "apart")
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=load_sampler, args=(samples, stop), daemon=True)
    try:
        with tempfile.TemporaryDirectory() as folder:
            load_before = os.getloadavg()[0]
            started = time.strftime("%H:%M:%S")
            sampler.start()
            start = time.perf_counter()
            try:
                done = subprocess.run([*moekit_command(), *command, *args], cwd=folder, env=env, check=False,
                                      capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:  # the pathological cases take many minutes: enough to know
                done = None
            seconds = time.perf_counter() - start
    finally:
        stop.set()
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if done is not None and done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}")
    first = (done.stderr.splitlines() or [""])[0] if done is not None else ""
    return {"config": name, "condition": condition, "started": started, "seconds": round(seconds, 1),
            "timed_out": done is None,
            "load_before": round(load_before, 2),
            "load_during": round(statistics.mean(samples), 2) if samples else None,
            "first_line": first if first.startswith("threads:") else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", default=" ".join(README_FIRST), help="the moekit command, run in a new folder")
    parser.add_argument("--configs", default="default,t1", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--conditions", default="idle,busy,apart", help="comma-separated, of idle, busy, apart")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds after which a run is stopped")
    parser.add_argument("--pause", type=float, default=0, help="seconds to wait between runs")
    args = parser.parse_args()
    names = args.configs.split(",")
    runs = []
    for _ in range(args.repeats):
        for condition in args.conditions.split(","):
            for name in names:
                if runs:
                    time.sleep(args.pause)
                runs.append(one_run(shlex.split(args.command), name, condition, timeout=args.timeout))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {}
    for condition in args.conditions.split(","):
        for name in names:
            mine = [r for r in runs if r["config"] == name and r["condition"] == condition]
            summary[f"{condition} {name}"] = {"median_seconds": statistics.median(r["seconds"] for r in mine),
                                               "seconds": [r["seconds"] for r in mine],
                                               "load_during": [r["load_during"] for r in mine],
                                               "timed_out": sum(r["timed_out"] for r in mine)}
    print(json.dumps({
        "command": f"moekit {args.command}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                   f"({len(os.sched_getaffinity(0))} usable)",
        "date": str(date.today()), "commit": commit(), "summary": summary, "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
