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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compression import calibrate_once, commit, eval_rows, machine  # noqa: E402

RIDGES = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0]
REMOVE = [0.25, 0.5]
MODELS = ["moekit/ref-fine", "moekit/ref-coarse"]


def main() -> None:
    from moekit.calib.stats import CalibrationStats
    from moekit.io.load import load, stored_dtype
    from moekit.io.save import round_for_storage
    from moekit.recipe import Recipe
    from moekit.train.evaluate import evaluate

    torch.set_num_threads(1)
    results = {"machine": machine(1), "date": str(date.today()), "commit": commit(), "rows": []}
    for model_name in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            calibrate_once(model_name, Path(tmp) / "stats")
            rows = eval_rows(model_name, 4)
            for remove in REMOVE:
                for ridge in RIDGES:
                    step = {"type": "prune", "method": "reap", "remove": remove, "budget": "uniform",
                            "refit": True, "refit_ridge": ridge}
                    model = load(model_name)
                    stats = CalibrationStats.load(str(Path(tmp) / "stats"), model=model)
                    Recipe.from_dict({"steps": [step]}).steps[0].apply(model, stats)
                    round_for_storage(model, stored_dtype(model_name))
                    result = evaluate(model, rows, batch_size=16)
                    row = {"model": model_name, "remove": remove, "ridge": ridge,
                           "perplexity": result.perplexity, "accuracy": result.accuracy}
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
