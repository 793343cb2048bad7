"""`moekit eval` on the shipped reference models, side by side: the numbers in
docs/reference-models.md.

Runs the CLI itself (``moekit eval moekit/ref-fine moekit/ref-coarse --tasks
moekit_stdlib_nexttoken --json``) on the whole shipped ``stdlib:eval`` split with its
defaults (windows of 256 tokens, stride 128), so the page shows what a user's command
prints.

    python benchmarks/reference_models.py

Writes ``benchmarks/results/reference_models.json`` and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

MODELS = ["moekit/ref-fine", "moekit/ref-coarse"]
TASK = "moekit_stdlib_nexttoken"


def main() -> None:
    command = [sys.executable, "-m", "moekit", "eval", *MODELS, "--tasks", TASK, "--json"]
    out = subprocess.run(command, check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    payload = json.loads(out.stdout)
    payload["command"] = "moekit eval " + " ".join(command[4:])
    payload["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    payload["date"] = str(date.today())
    path = Path(__file__).parent / "results" / "reference_models.json"
    path.write_text(json.dumps(payload, indent=2))
    print(markdown(payload))


def markdown(payload: dict) -> str:
    models = payload["models"]
    names = list(models)
    first = models[names[0]]
    lines = [f"`{payload['command']}` — {first['tokens']:,} tokens of `{payload['data']}`",
             "", "| metric | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|",
             "| perplexity | " + " | ".join(f"{models[n]['perplexity']:.2f}" for n in names) + " |",
             "| next-token accuracy | " + " | ".join(f"{models[n]['accuracy']:.2%}" for n in names) + " |"]
    for metric in ("acc", "acc_norm"):
        cells = []
        for n in names:
            task = models[n].get("tasks", {}).get(TASK, {})
            value, stderr = task.get(metric), task.get(f"{metric}_stderr")
            cells.append("" if value is None else f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}"))
        lines.append(f"| {TASK} {metric} (chance 0.25) | " + " | ".join(cells) + " |")
    depth = max(len(models[n]["layers"]) for n in names)
    for i in range(depth):
        cells = []
        for n in names:
            layers = models[n]["layers"]
            cells.append("" if i >= len(layers) else
                         f"{layers[i]['entropy_normalized']:.3f} / {layers[i]['load_imbalance']:.2f}")
        lines.append(f"| layer {i}: router entropy / log E, load max/mean | " + " | ".join(cells) + " |")
    lines.append(f"\n{payload['machine']}, {payload['date']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
