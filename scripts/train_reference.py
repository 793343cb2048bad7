"""Train moekit's reference MoE models on the Python standard library.

    python scripts/train_reference.py ref-fine  --threads 2            # full recipe
    python scripts/train_reference.py ref-coarse --threads 2
    python scripts/train_reference.py ref-dense --threads 1            # dense Qwen3, ref-fine's tokenizer
    python scripts/train_reference.py ref-fine --steps 300 --work runs/try  # a short trial (every stage)
    python scripts/train_reference.py ref-fine --until-stage 2             # report on stage 2 only

A model trains in stages (``RECIPES``), each in ``--work/<name>/stage-k`` with its own
checkpoints (rerun the same command to resume after an interruption; finished stages are
skipped). When the last stage finishes, the model is evaluated on the *whole* shipped
``stdlib:eval`` split with its weights rounded to bf16 (what ships), and checked against
the reference criteria:

- eval perplexity below 1/8 of an add-one unigram model's on the same split;
- no dead expert: every expert of every layer gets at least 1/4 of the uniform share
  of routed tokens on the eval split;
- the eval loss has flattened: it fell by less than 1% over the last eighth of all steps.

Only a model that passes is written to ``src/moekit/zoo/<name>/`` (config.json, bf16
model.safetensors, tokenizer, training.json, train_log.json, README.md, and
learning_curve.png when matplotlib is installed); ``--force`` writes it anyway.

Measured on the development machine (2 shared cores, fp32, seq 256 x batch 16):
ref-fine (12.36 M params, 24.7 MB bf16) trains at ~1,250-1,400 tokens/s on 1 thread and
~2,200 on 2; ref-coarse (12.33 M, 24.7 MB) at ~1,150 and ~2,000. The stdlib train split
is 8.25 M tokens; the unigram perplexity on stdlib:eval is 649 (target < 81).
Short trials of ref-fine: eval ppl 191 after 150 steps (0.6 M tokens, lr decayed to
the end), 234-242 at step 100 of a 400-step schedule; with aux_loss_coef 0.01 the
expert-load imbalance (max/fair share) was 3.5 at step 100, with 0.05 it was 2.3 at
no cost in perplexity, but several experts per layer were still under 1/4 of their
fair share at step 100. ref-coarse with aux_loss_coef 0.02 (Mixtral's default): the
least-used expert fell from 0.33 of its fair share at step 250 to 0.15 at step 500, so
it uses 0.05 too.

Stage 1 alone (ref-fine 1,500 steps in 1.0 h, ref-coarse 2,000 steps = one epoch in 0.8 h,
2 threads) reached whole-split perplexity 12.79 / 12.33, with the eval loss still falling
2.3% / 2.5% over its last eighth. Stage 2 (1,200 steps each, 0.7-0.8 h on 1 thread while
the other model trained on the other core) restarted the lr at 1e-3: the subset eval loss
first rose 3.6% / 4.1%, regained stage 1's level after 450 / 600 steps, and ended at
perplexity 10.59 / 10.58 (accuracy 56.2% / 55.9%), still falling 1.8% / 3.8% over the
last eighth of all steps. Stage 3 (5,000 steps, 3.1 h / 3.4 h of training steps on 1 thread
per model, both training at once; 31.5 M / 33.6 M tokens in all, about four epochs of the
train split) ended at perplexity 8.32 / 8.53 and accuracy 59.5% / 59.0%; the subset eval loss
moved by under 0.5% over its last 1,000 steps, and fell 0.45% / 0.53% over the last
eighth of all steps. Both pass every criterion and are the shipped models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from moekit.train.run import run_training  # noqa: E402
from moekit.train import evaluate  # noqa: E402
from moekit.train.presets import REFERENCE  # noqa: E402
from moekit.io.save import write_json_atomically  # noqa: E402

# Each model trains in stages. A later stage starts from the earlier stage's weights rounded
# to bf16 (exactly what that stage published), with a fresh AdamW, its own warmup + cosine
# schedule and its own data order (seed). Stage 1 was settled on short runs (see above);
# stages 2 and 3 continue it because its eval loss had not flattened.
_COMMON = dict(batch_size=16, grad_accum=1, aux_loss_coef=0.05, z_loss_coef=1e-3, bias_update_rate=0.0)
RECIPES: dict[str, list[dict]] = {
    "ref-fine": [
        dict(_COMMON, steps=1500, lr=3e-3, warmup=150, checkpoint_every=187, eval_every=187, seed=0),
        dict(_COMMON, steps=1200, lr=1e-3, warmup=100, checkpoint_every=150, eval_every=150, seed=1),
        dict(_COMMON, steps=5000, lr=1e-3, warmup=100, checkpoint_every=125, eval_every=250, seed=2),
    ],
    # the dense reference trains on ref-fine's schedule (same tokens), so the two compare
    "ref-dense": [
        dict(_COMMON, steps=1500, lr=3e-3, warmup=150, checkpoint_every=187, eval_every=187, seed=0),
        dict(_COMMON, steps=1200, lr=1e-3, warmup=100, checkpoint_every=150, eval_every=150, seed=1),
        dict(_COMMON, steps=5000, lr=1e-3, warmup=100, checkpoint_every=125, eval_every=250, seed=2),
    ],
    "ref-coarse": [
        dict(_COMMON, steps=2000, lr=3e-3, warmup=200, checkpoint_every=250, eval_every=250, seed=0),
        dict(_COMMON, steps=1200, lr=1e-3, warmup=100, checkpoint_every=150, eval_every=150, seed=1),
        dict(_COMMON, steps=5000, lr=1e-3, warmup=100, checkpoint_every=125, eval_every=250, seed=2),
    ],
}
SEQ_LEN, VOCAB = 256, 8192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(REFERENCE))
    parser.add_argument("--steps", type=int, help="override every stage's step count (trials)")
    parser.add_argument("--until-stage", type=int,
                        help="train (or reuse) the stages up to this one and report on it, without publishing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "reference")
    parser.add_argument("--zoo", type=Path, default=REPO / "src" / "moekit" / "zoo")
    parser.add_argument("--tokenizer", type=Path, help="reuse a tokenizer folder instead of training one")
    parser.add_argument("--force", action="store_true", help="write to the zoo even if criteria fail")
    parser.add_argument("--refresh-card", action="store_true",
                        help="re-evaluate the published model and rewrite its training.json, card and plot")
    args = parser.parse_args()
    if args.refresh_card:
        refresh_card(args.zoo / args.name, args.threads)
        return

    torch.set_num_threads(args.threads)
    stages = [trial(stage, args.steps) if args.steps else dict(stage) for stage in RECIPES[args.name]]
    partial = args.until_stage is not None and args.until_stage < len(stages)
    stages = stages[: args.until_stage] if partial else stages
    work = args.work / args.name
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "model_spec.json"
    spec_path.write_text(REFERENCE[args.name].model_dump_json(indent=1))
    # the dense reference shares ref-fine's tokenizer, so upcycled models compare with it
    tokenizer = args.tokenizer or (REPO / "src" / "moekit" / "zoo" / "ref-fine" if args.name == "ref-dense" else None)
    results = []
    for k, recipe in enumerate(stages, start=1):
        result = run_stage(k, recipe, work, spec_path, tokenizer)
        if result is None:
            print(f"interrupted in stage {k}; rerun the same command to resume")
            return
        results.append(result)
    report = final_report(args.name, work, stages, results, args.threads)
    print(json.dumps(report["criteria"] | {"eval_perplexity": report["eval"]["perplexity"],
                                           "accuracy": report["eval"]["accuracy"]}, indent=1))
    if partial:
        return
    if report["criteria"]["pass"] or args.force:
        publish(args.name, work, report, args.zoo / args.name)
    else:
        print(f"criteria not met; the model stays in {work / f'stage-{len(stages)}' / 'model'} "
              "(use --force to publish anyway)")


def trial(stage: dict, steps: int) -> dict:
    return dict(stage, steps=steps, warmup=min(stage["warmup"], max(1, steps // 10)),
                eval_every=max(1, steps // 8), checkpoint_every=max(1, steps // 8))


def run_stage(k: int, recipe: dict, work: Path, spec_path: Path, tokenizer: Path | None) -> dict | None:
    """Train stage ``k`` in ``work/stage-k`` (resuming if interrupted) unless it is done;
    returns its summary (``done.json``), or None if it was interrupted."""
    out = work / f"stage-{k}"
    done = out / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    init = None
    if k > 1:
        init = out / "init"
        if not (init / "config.json").is_file():
            round_to_bf16(work / f"stage-{k - 1}" / "model", init)
    t0 = time.time()
    result = run_training(arch=str(spec_path), init=init, data="stdlib", eval_data="stdlib:eval", text_field="text",
                          tokenizer=tokenizer if k == 1 else None, vocab_size=VOCAB, seq_len=SEQ_LEN, out=out,
                          show_progress=True, dtype="float32", **recipe)  # stages publish bf16 themselves
    if result["interrupted"]:
        return None
    summary = {"recipe": recipe, "steps": result["steps"], "params": result["params"],
               # a stage interrupted by the end of a session resumes in the next: only the
               # training steps' own time adds up across sessions
               "wall_time_last_session_s": time.time() - t0,
               "train_seconds_all_sessions": result["train_seconds_all_sessions"],
               "tokens_per_s": result["tokens_per_s"], "machine": machine(torch.get_num_threads())}
    write_json_atomically(done, summary)  # the stage's completion marker: whole or absent
    return summary


def round_to_bf16(src: Path, dst: Path) -> None:
    """What a stage publishes: its model in bf16 (with its tokenizer), the next stage's start."""
    from transformers import AutoModelForCausalLM

    from moekit.io.save import save

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, use_safetensors=True), tmp,
         dtype=torch.bfloat16)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, tmp / f.name)
    tmp.rename(dst)


SAMPLE_EVERY = 8


def evaluate_shipped(model, tok) -> dict:
    """Perplexity, next-token accuracy and expert load on the whole stdlib:eval split,
    packed in rows of SEQ_LEN (each row its own window)."""
    from moekit.data import load_corpus, pack, tokenize_corpus

    rows = pack(tokenize_corpus(load_corpus("stdlib:eval"), tok), SEQ_LEN)
    result = evaluate(model, rows, batch_size=16)
    # every SAMPLE_EVERY-th row too: what the test suite re-measures (the whole split takes minutes)
    sample = evaluate(model, rows[::SAMPLE_EVERY], batch_size=16)
    return {"loss": result.loss, "perplexity": result.perplexity, "accuracy": result.accuracy,
            "tokens": result.tokens, "load": {str(k): v for k, v in result.load.items()},
            "min_load_ratio": result.min_load_ratio(), "max_load_ratio": result.max_load_ratio(),
            "sample": {"every": SAMPLE_EVERY, "perplexity": sample.perplexity, "accuracy": sample.accuracy,
                       "tokens": sample.tokens}}


def refresh_card(target: Path, threads: int) -> None:
    """Recompute the published model's evaluation (as shipped: bf16 weights, fp32 compute)
    and rewrite training.json, README.md and learning_curve.png."""
    from transformers import AutoModelForCausalLM

    from moekit.data.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    report = json.loads((target / "training.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32, use_safetensors=True).eval()
    fresh = evaluate_shipped(model, load_tokenizer(target))
    unigram = report["eval"]["unigram_perplexity"]
    report["eval"] = {**fresh, "unigram_perplexity": unigram}
    report["criteria"] = criteria(fresh["perplexity"], unigram, fresh["min_load_ratio"], report["curve"])
    (target / "training.json").write_text(json.dumps(report, indent=1))
    plot_curve(json.loads((target / "train_log.json").read_text()), target / "learning_curve.png")
    (target / "README.md").write_text(model_card(report))
    print(json.dumps(report["criteria"] | {"eval_perplexity": fresh["perplexity"], "accuracy": fresh["accuracy"]}))


def criteria(perplexity: float, unigram: float, min_load: float, curve: list[dict]) -> dict:
    drop = last_eighth_drop(curve)
    return {
        "perplexity_ratio_to_unigram": perplexity / unigram,
        "perplexity_below_unigram_over_8": perplexity < unigram / 8,
        "min_expert_share_over_uniform": min_load,
        "no_dead_experts": min_load >= 0.25,
        "eval_loss_drop_over_last_eighth": drop,
        "eval_loss_flattened": drop < FLAT,
        "pass": perplexity < unigram / 8 and min_load >= 0.25 and drop < FLAT,
    }


FLAT = 0.01  # "flattened": the eval loss fell by less than 1% over the last eighth of all training steps


def last_eighth_drop(curve: list[dict]) -> float:
    """Relative fall of the eval loss from the evaluation nearest 7/8 of training to the last."""
    last = curve[-1]
    earlier = min(curve, key=lambda c: abs(c["step"] - last["step"] * 7 / 8))
    return (earlier["eval_loss"] - last["eval_loss"]) / earlier["eval_loss"]


def machine(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__}


def combined_log(work: Path, n_stages: int) -> dict:
    """The stages' train logs as one curve over global steps (stage k's step s is the sum of
    the earlier stages' steps plus s), with where each stage starts."""
    out: dict = {"stages": [], "history": [], "evals": []}
    offset = 0
    for k in range(1, n_stages + 1):
        log = json.loads((work / f"stage-{k}" / "train_log.json").read_text())
        out["stages"].append({"first_step": offset + 1, "config": log["config"], "meta": log["meta"]})
        out["history"] += [h | {"step": h["step"] + offset} for h in log["history"]]
        out["evals"] += [e | {"step": e["step"] + offset} for e in log["evals"]]
        offset += log["config"]["steps"]
    return out


def final_report(name: str, work: Path, stages: list[dict], results: list[dict], threads: int) -> dict:
    """Evaluate the last stage's model rounded to bf16 on the whole eval split; check the criteria."""
    from transformers import AutoModelForCausalLM

    from moekit.data.tokenizer import load_tokenizer
    from moekit.io.save import round_for_storage

    last = work / f"stage-{len(stages)}"
    model = AutoModelForCausalLM.from_pretrained(last / "model", dtype=torch.float32, use_safetensors=True)
    round_for_storage(model, torch.bfloat16)  # score exactly what `publish` writes
    fresh = evaluate_shipped(model, load_tokenizer(last / "model"))
    info = json.loads((last / "data" / "manifest.json").read_text())
    unigram = info["unigram_eval_perplexity"]
    curve = [{"step": e["step"], "eval_loss": e["loss"]} for e in combined_log(work, len(stages))["evals"]]
    tokens_per_step = [s["batch_size"] * s["grad_accum"] * SEQ_LEN for s in stages]
    return {
        "name": name, "seed": stages[0]["seed"], "model_spec": REFERENCE[name].model_dump(), "seq_len": SEQ_LEN,
        "stages": [r | {"tokens": r["steps"] * t} for r, t in zip(results, tokens_per_step)],
        "train_tokens_seen": sum(r["steps"] * t for r, t in zip(results, tokens_per_step)),
        "train_split_tokens": info["train_tokens"], "train_split_sha256": info["train"]["sha256"],
        "eval_split_sha256": info["eval"]["sha256"], "params": results[-1]["params"], "vocab_size": info["vocab_size"],
        "eval": {**fresh, "unigram_perplexity": unigram},
        "criteria": criteria(fresh["perplexity"], unigram, fresh["min_load_ratio"], curve),
        "machine": machine(threads),
        "train_step_seconds_all_sessions": sum(r["train_seconds_all_sessions"] for r in results),
        "curve": curve,
    }


def publish(name: str, work: Path, report: dict, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    last = work / f"stage-{len(report['stages'])}"
    round_to_bf16(last / "model", tmp)
    log = combined_log(work, len(report["stages"]))
    (tmp / "train_log.json").write_text(json.dumps(log))
    (tmp / "training.json").write_text(json.dumps(report, indent=1))
    plot_curve(log, tmp / "learning_curve.png")
    (tmp / "README.md").write_text(model_card(report))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"published {target} ({sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB)")


def plot_curve(log: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in log["history"]], [h["loss"] for h in log["history"]], lw=0.5, label="train")
    ax.plot([e["step"] for e in log["evals"]], [e["loss"] for e in log["evals"]], "o-", label="eval (subset)")
    for stage in log.get("stages", [])[1:]:
        ax.axvline(stage["first_step"] - 0.5, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="step (dashed: a new stage starts)", ylabel="cross-entropy (nats)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def model_card(r: dict) -> str:
    spec, ev, crit = r["model_spec"], r["eval"], r["criteria"]
    dense = spec.get("intermediate_size") is not None
    return f"""---
license: apache-2.0
library_name: transformers
tags: [{'' if dense else 'moe, '}moekit, reference-model]
---
# moekit/{r['name']}

{_purpose(spec, dense)}
It is a test subject, not a useful code model.

| | |
|---|---|
| family | `{spec['family']}` |
| layers / hidden | {spec['num_layers']} / {spec['hidden_size']} |
{_width_row(spec, dense)}
| parameters | {r['params'] / 1e6:.2f} M (stored bf16, compute in fp32) |
| vocabulary | byte-level BPE, {r["vocab_size"]} tokens, trained on the train split |
| training tokens | {r['train_tokens_seen'] / 1e6:.1f} M ({r['train_split_tokens'] / 1e6:.1f} M-token train split) |
| seed | {r['seed']} |
| training time | {r['train_step_seconds_all_sessions'] / 3600:.2f} h of training steps (stages below) |

## Evaluation (shipped `stdlib:eval` split, sha256 `{r['eval_split_sha256'][:16]}…`)

| | |
|---|---|
| perplexity | {ev['perplexity']:.2f} |
| next-token accuracy | {ev.get('accuracy', float('nan')):.2%} |
| unigram perplexity | {ev['unigram_perplexity']:.1f} (ratio {crit['perplexity_ratio_to_unigram']:.3f}; required < 0.125) |
{'' if dense else _load_rows(ev, crit)}

![learning curve](learning_curve.png)

Eval loss over training (`train_log.json`, a subset of the eval split):
{_curve_lines(r)}

{_flatness(r)}

## Training

{_stage_lines(r)}

Every stage: AdamW (β = 0.9, 0.95, weight decay 0.1), warmup then cosine to 10% of the
peak lr, batches of {r['stages'][0]['recipe']['batch_size']}×{r['seq_len']} tokens, gradient clipping 1.0{_router_losses(r, dense)}. A later stage starts from the earlier stage's
weights rounded to bf16, with a fresh optimizer, its own schedule and its own data order
(seed). Full details in `training.json`, the curve in `train_log.json`.

## Reproduce

```
python scripts/train_reference.py {r['name']} --threads {r['machine']['threads']}
```
"""


def _purpose(spec: dict, dense: bool) -> str:
    if dense:
        return (f"A small dense {spec['family']} causal LM trained from scratch by moekit on the source code of\n"
                "the Python standard library (the same tokenizer, data and schedule as moekit/ref-fine),\n"
                "shipped inside the moekit package as the starting point of `moekit upcycle` and\n"
                "`moekit split`: its MLP is as wide as ref-fine's active experts together.")
    return (f"A small {spec['family']} Mixture-of-Experts causal LM trained from scratch by moekit on the\n"
            "source code of the Python standard library, shipped inside the moekit package as a\n"
            "reference model on which compression methods can be compared without any download.")


def _width_row(spec: dict, dense: bool) -> str:
    if dense:
        return f"| MLP width | {spec['intermediate_size']} (dense: no experts) |"
    return (f"| experts per layer / top-k | {spec['num_experts']} / {spec['top_k']} "
            f"(expert width {spec['expert_intermediate_size']}) |")


def _load_rows(ev: dict, crit: dict) -> str:
    return (f"| least-used expert / uniform share | {crit['min_expert_share_over_uniform']:.2f} (required ≥ 0.25) |\n"
            f"| busiest expert / uniform share | {ev.get('max_load_ratio', float('nan')):.2f} |\n\n"
            "Expert load per layer (share of top-k selections × E; 1 = uniform), min / max:\n"
            f"{_load_lines(ev)}")


def _router_losses(r: dict, dense: bool) -> str:
    recipe = r["stages"][0]["recipe"]
    if dense:
        return " (no router: the load-balancing and z losses do not apply)"
    return f", load-balancing loss ×\n{recipe['aux_loss_coef']}, router z-loss × {recipe['z_loss_coef']}"


def _stage_lines(r: dict) -> str:
    lines = []
    for k, st in enumerate(r["stages"], start=1):
        rec, m = st["recipe"], st["machine"]
        lines.append(f"{k}. {st['steps']} steps ({st['tokens'] / 1e6:.1f} M tokens), peak lr {rec['lr']}, "
                     f"{rec['warmup']} warmup steps, data seed {rec['seed']}: {st['train_seconds_all_sessions'] / 3600:.2f} h "
                     f"of training steps on {m['processor']}, {m['threads']} thread(s), {m['platform']}.")
    return "\n".join(lines)


def _load_lines(ev: dict) -> str:
    load = ev.get("load", {})
    return "\n".join(f"- layer {i}: {min(v) * len(v):.2f} / {max(v) * len(v):.2f}" for i, v in load.items())


def _flatness(r: dict) -> str:
    drop = last_eighth_drop(r["curve"])
    verdict = ("it had flattened" if drop < FLAT else
               "it was still falling, so longer training would lower it further")
    return (f"Over the last eighth of all training steps the eval loss fell by {drop:.1%} "
            f"(flattened means under {FLAT:.0%}): {verdict}.")


def _curve_lines(r: dict) -> str:
    return "\n".join(f"- step {c['step']}: {c['eval_loss']:.4f}" for c in r.get("curve", []))


if __name__ == "__main__":
    main()
