"""Benchmark of the layer-streamed pipeline (issue 12): moekit commands on synthetic checkpoints.

For each checkpoint (a synthetic preset written to /tmp and deleted afterwards, or a folder
given with --checkpoint and kept) it measures, each in a fresh subprocess with the
checkpoint first evicted from the page cache (see measure.py for what every number means):
  - the writer (presets only);
  - reading every tensor once with safe_open (the floor for anything that reads the model);
  - one decoder layer's forward of the calibration rows in fp32 (a 1-layer model built from
    the config with transformers), times the layer count: the compute of one streamed pass;
  - the moekit commands in RUNS, with the CLI's defaults (no --threads).
A failing or killed command is recorded (exit code, last stderr line) and the rest go on.
Results merge into benchmarks/results/streaming-<date>.json; --render prints the tables.

    python benchmarks/streaming.py --preset s24 --code current,contrast   # streamed and in-memory (b265a9f)
    python benchmarks/streaming.py --preset s48 --preset big              # after the pipeline lands
    python benchmarks/streaming.py --checkpoint s24=/tmp/my-s24           # an existing checkpoint, kept
    python benchmarks/streaming.py --render                               # today's results as markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import measure  # noqa: E402
import streaming_report  # noqa: E402
import synthetic  # noqa: E402

SAMPLES, SEQ_LEN = 8, 128
RUNS = {
    "compress reap-50": ["compress", "{ckpt}", "--recipe", "reap-50", "-o", "{out}", "--samples", str(SAMPLES),
                         "--seq-len", str(SEQ_LEN), "--json"],
    "compress prune-50": ["compress", "{ckpt}", "--recipe", "prune-50", "-o", "{out}", "--samples", str(SAMPLES),
                          "--seq-len", str(SEQ_LEN), "--json"],
    "eval": ["eval", "{ckpt}", "--max-tokens", "2048", "--json"],
}
CONTRAST_COMMIT = "b265a9f"  # the last commit before streaming: every command holds the model in fp32
GIB = 2**30


def read_once(ckpt: str) -> None:
    """Child mode: every tensor of the checkpoint read once through safe_open, then dropped."""
    from safetensors import safe_open

    elements, start = 0, time.perf_counter()
    for file in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                elements += f.get_tensor(name).numel()
    print(json.dumps({"elements": elements, "read_s": round(time.perf_counter() - start, 2)}))


def forward_one_layer(ckpt: str, samples: int = SAMPLES, seq_len: int = SEQ_LEN) -> None:
    """Child mode: seconds for one decoder layer's forward of the calibration rows, fp32, best of 3."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt)
    layers = config.num_hidden_layers
    config.num_hidden_layers = 1
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:1]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(3, config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(4):  # the first call warms up kernels and allocations; not counted
            start = time.perf_counter()
            model.model(ids)
            times.append(time.perf_counter() - start)
    print(json.dumps({"layer_s": min(times[1:]), "layers": layers, "threads": torch.get_num_threads()}))


def _child(mode: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), f"--{mode}", *args]


def _trim(report) -> dict | None:
    """Top-level report entries that are small (sizes, seconds, notes); drops per-expert lists."""
    if not isinstance(report, dict):
        return None
    return {k: v for k, v in report.items() if len(json.dumps(v)) <= 2000}


def _parse_json(stdout: str):
    try:
        return json.loads(stdout[stdout.index("{"):]) if "{" in stdout else None
    except json.JSONDecodeError:
        return None


def checkpoint_info(ckpt: Path) -> dict:
    config = json.loads((ckpt / "config.json").read_text())
    files = list(ckpt.glob("*.safetensors"))
    return {"model_type": config["model_type"], "layers": config["num_hidden_layers"],
            "hidden": config["hidden_size"], "bytes": sum(f.stat().st_size for f in files), "shards": len(files)}


def _record(name: str, code: str, run: str, result: dict, **extra) -> dict:
    stdout = result.pop("stdout")
    return {"checkpoint": name, "code": code, "run": run, **extra, **result,
            "report": _trim(_parse_json(stdout)) if run in RUNS else _parse_json(stdout)}


def measure_checkpoint(ckpt: Path, name: str, code: str, runs: list[str], env: dict | None = None,
                       mem_limit: int | None = None, timeout: float | None = None, floors: bool = True) -> list[dict]:
    """Every measurement on one checkpoint; ``floors`` adds the read-once and forward references."""
    records = []
    moekit = [sys.executable, "-c", "import sys; from moekit.cli import main; sys.argv[0] = 'moekit'; sys.exit(main())"]
    steps = [("read once", _child("read-once", str(ckpt)), None),
             ("forward one layer", _child("forward-one-layer", str(ckpt)), None)] if floors else []
    for run in runs:
        steps.append((run, None, run))
    for label, cmd, run in steps:
        work = Path(tempfile.mkdtemp(prefix="moekit-bench-"))  # the command's output, deleted once measured
        if run:
            cmd = moekit + [a.format(ckpt=ckpt, out=work / "out") for a in RUNS[run]]
        cache, load = measure.evict(ckpt), round(os.getloadavg()[0], 2)
        print(f"[{name} / {code}] {label} ...", file=sys.stderr, flush=True)
        result = measure.run(cmd, env=env, mem_limit=mem_limit, timeout=timeout)
        out_bytes = sum(f.stat().st_size for f in (work / "out").rglob("*") if f.is_file()) if run else None
        shutil.rmtree(work, ignore_errors=True)
        # The machine is shared: the load average before each run says how much the others were using it.
        records.append(_record(name, code, label, result, page_cache=cache, output_bytes=out_bytes,
                               load_avg_1m=load))
        r = records[-1]
        print(f"  exit {r['exit_code']} {r['killed'] or ''} wall {r['wall_s']} s, peak RSS {r['peak_rss_mib']} MiB, "
              f"disk read {r['disk_read_bytes'] / 1e9:.2f} GB  {r['last_stderr_line'][:120]}", file=sys.stderr)
    return records


def code_label(contrast: bool, commit: str = CONTRAST_COMMIT) -> str:
    if contrast:
        return f"in-memory @ {commit}"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src/moekit"],
                           capture_output=True, text=True).stdout.strip()
    return f"current @ {head.stdout.strip()}" + (" + uncommitted src/moekit" if dirty else "")


def contrast_env(commit: str) -> tuple[dict, Path]:
    """PYTHONPATH pointing at a detached worktree of ``commit`` (ahead of the venv's editable install)."""
    tree = Path(tempfile.gettempdir()) / f"moekit-contrast-{commit}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    where = subprocess.run([sys.executable, "-c", "import moekit; print(moekit.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(tree)):
        raise SystemExit(f"contrast imports moekit from {where}, not from {tree}")
    return env, tree


def machine() -> str:
    mem = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem / 2**20:.0f} GiB RAM"


def save(records: list[dict], checkpoints: dict, path: Path) -> None:
    """Merge into the day's file: a record replaces an earlier one of the same checkpoint, code kind and run."""
    data = json.loads(path.read_text()) if path.exists() else {"runs": [], "checkpoints": {}}
    key = lambda r: (r["checkpoint"], r["code"].split(" @ ")[0], r["run"])  # noqa: E731
    new = {key(r) for r in records}
    data["runs"] = [r for r in data["runs"] if key(r) not in new] + records
    data["checkpoints"].update(checkpoints)
    data.update(machine=machine(), date=str(date.today()), samples=SAMPLES, seq_len=SEQ_LEN)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def measure_all(ckpt: Path, name: str, args, codes: dict) -> list[dict]:
    """The floors once (they do not depend on moekit's code), then the runs for each code."""
    records, limit = [], int(args.mem_limit_gib * GIB)
    for i, (code, env) in enumerate(codes.items()):
        records += measure_checkpoint(ckpt, name, code, args.runs, env, limit, args.timeout,
                                      floors=i == 0 and not args.no_floors)
    return records


def measure_preset(preset: str, sizes: dict, args, codes: dict) -> None:
    """Write the preset under /tmp, measure everything on it, always delete it."""
    ckpt = Path(tempfile.gettempdir()) / f"moekit-bench-{preset}"
    shutil.rmtree(ckpt, ignore_errors=True)
    # Explicit sizes rather than --preset, so the writer writes exactly the sizes this process knows.
    flags = [x for k, v in sizes.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    written = measure.run([sys.executable, str(HERE / "synthetic.py"), str(ckpt), *flags])
    try:
        records = [_record(preset, "synthetic.py", "write", written)]
        ok = records[0]["exit_code"] == 0
        if ok:
            records += measure_all(ckpt, preset, args, codes)
        save(records, {preset: checkpoint_info(ckpt)} if ok else {}, args.results)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(str(ckpt) + ".partial", ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", default=[], choices=sorted(synthetic.PRESETS),
                   help="synthetic preset to write under /tmp, measure and delete (repeatable)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                   help="existing checkpoint, kept; NAME (default: the folder's name) is what the goals look up")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    p.add_argument("--code", default="current", help="current, contrast or current,contrast (one write serves both)")
    p.add_argument("--contrast", action="store_true", help="same as --code contrast")
    p.add_argument("--commit", default=CONTRAST_COMMIT, help="the contrast's commit (default: before streaming)")
    p.add_argument("--no-floors", action="store_true", help="skip the read-once and forward references")
    p.add_argument("--mem-limit-gib", type=float, default=16.0, help="SIGKILL a run whose RSS passes this")
    p.add_argument("--timeout", type=float, default=4 * 3600)
    p.add_argument("--results", type=Path, default=HERE / "results" / f"streaming-{date.today()}.json")
    p.add_argument("--render", nargs="?", const="", help="print a results file (default: --results) as markdown")
    p.add_argument("--read-once", help=argparse.SUPPRESS)
    p.add_argument("--forward-one-layer", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.read_once:
        return read_once(args.read_once)
    if args.forward_one_layer:
        return forward_one_layer(args.forward_one_layer)
    if args.render is not None:
        return print(streaming_report.render(json.loads(Path(args.render or args.results).read_text())))
    args.runs = [r for r in args.runs.split(",") if r]
    if unknown := set(args.runs) - set(RUNS):
        raise SystemExit(f"unknown runs {sorted(unknown)}; known: {list(RUNS)}")
    kinds = ["contrast"] if args.contrast else [k for k in args.code.split(",") if k]
    if not kinds or set(kinds) - {"current", "contrast"}:
        raise SystemExit("--code takes current, contrast or both")
    tree, codes = None, {}
    try:
        for kind in kinds:
            if kind == "contrast":
                env, tree = contrast_env(args.commit)
                codes[code_label(True, args.commit)] = env
            else:
                codes[code_label(False)] = None
        for spec in args.checkpoint:
            name, _, path = spec.rpartition("=")
            ckpt = Path(path).resolve()
            save(measure_all(ckpt, name or ckpt.name, args, codes), {name or ckpt.name: checkpoint_info(ckpt)},
                 args.results)
        for preset in args.preset:
            measure_preset(preset, synthetic.PRESETS[preset], args, codes)
    finally:
        if tree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    if args.results.exists():
        print(streaming_report.render(json.loads(args.results.read_text())))


if __name__ == "__main__":
    main()
