"""Is the refit's default ridge (``refit_ridge: 0.1``) still right on the final reference
models? It was settled on short trials on the first, shorter-trained ref-fine. This sweeps
the ridge for REAP + refit (the ``prune-25`` / ``prune-50`` step) on both shipped models,
with `compression.py`'s calibration and evaluation rows, scoring the bf16 weights as saved.

    python benchmarks/refit_ridge.py      # writes results/refit_ridge.json, prints a table
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compression import calibrate_once, commit, machine, one_config  # noqa: E402

RIDGES = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0]
REMOVE = [0.25, 0.5]
MODELS = ["moekit/ref-fine", "moekit/ref-coarse"]


def main() -> None:
    results = {"machine": machine(1), "date": str(date.today()), "commit": commit(), "rows": []}
    for model_name in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            stats_dir = str(Path(tmp) / "stats")
            calibrate_once(model_name, Path(stats_dir))
            for remove in REMOVE:
                for ridge in RIDGES:
                    step = {"type": "prune", "method": "reap", "remove": remove, "budget": "uniform",
                            "refit": True, "refit_ridge": ridge}
                    scored = one_config(model_name, stats_dir, step, eval_every=4, threads=1)
                    row = {"model": model_name, "remove": remove, "ridge": ridge,
                           "perplexity": scored["perplexity"], "accuracy": scored["accuracy"]}
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / "refit_ridge.json"
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| model | removed | " + " | ".join(f"ridge {r:g}" for r in RIDGES) + " |",
             "|---|---|" + "---|" * len(RIDGES)]
    for model_name in MODELS:
        for remove in REMOVE:
            by_ridge = {r["ridge"]: r["perplexity"] for r in results["rows"]
                        if r["model"] == model_name and r["remove"] == remove}
            best = min(by_ridge.values())
            cells = [f"**{p:.2f}**" if p == best else f"{p:.2f}" for p in (by_ridge[r] for r in RIDGES)]
            lines.append(f"| {model_name} | {remove:.0%} | " + " | ".join(cells) + " |")
    lines.append(f"\n{results['machine']}, {results['date']}, commit {results['commit']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
