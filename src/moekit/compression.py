"""`moekit.compress`: check the recipe, calibrate once, run the steps, save, report.

Everything a step needs is computed in one layer-streamed calibration (exactly the
statistics the steps declare). A step that follows a structural change and needs
statistics gets a fresh calibration of the changed model. The output folder appears
only when complete: a standard checkpoint (or moekit's non-uniform format), the
tokenizer, ``recipe.yaml`` as run, ``report.json`` and a model card.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.arch.adapters import FAMILIES
from moekit.arch.edit import PER_LAYER_KEY
from moekit.arch.summary import summarize
from moekit.errors import MoekitError
from moekit.recipe import ModelInfo, Recipe, load_recipe


def model_info(config: Any) -> ModelInfo:
    """Experts, top-k and groups from a config alone (recipes are checked before loading)."""
    model_type = getattr(config, "model_type", None)
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if family is None:
        raise MoekitError(
            f"model_type {model_type!r} is not a supported MoE family; supported: {', '.join(sorted(FAMILIES))}."
        )
    top_k = int(getattr(config, family.top_k_key))
    spec = family.routing.resolve(config, top_k)
    return ModelInfo(family=family.name, num_experts=int(getattr(config, family.num_experts_key)),
                     top_k=top_k, routing=spec)


def checked_recipe(name: str, recipe: Recipe | str | os.PathLike | dict) -> tuple[Recipe, Any]:
    """The recipe, checked step by step against ``name``'s config (no weights read), each
    step against the expert count the steps before it leave; returns it with that config."""
    from moekit.io.load import load_config

    recipe = load_recipe(recipe)
    config = load_config(name)
    info = model_info(config)
    for step in recipe.steps:
        step.check(info)
        info = dataclasses.replace(info, num_experts=step.kept_per_layer(info.num_experts))  # what the next sees
    return recipe, config


def summary(model: nn.Module, stored: torch.dtype) -> dict:
    """Sizes for reports: parameters (total, active per token, routed), bytes as stored in
    ``stored``, experts per MoE layer."""
    s = summarize(model, stored_dtype=stored)
    return {"total_params": s.total_params, "active_params": s.active_params, "routed_params": s.routed_params,
            "bytes": s.total_bytes, "experts_per_layer": {str(l.index): l.num_experts for l in s.layers if l.kind == "moe"}}


def compress(
    model: str | os.PathLike | None,
    recipe: Recipe | str | os.PathLike | dict,
    *,
    out_dir: str | os.PathLike,
    data: str = "stdlib:calib",
    n_samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
    evaluate: bool = False,
    eval_data: str = "stdlib:eval",
    eval_max_tokens: int | None = 32768,
    batch_size: int = 8,
    dtype: str = "auto",
    progress: bool = True,
) -> dict:
    """Compress ``model`` with ``recipe`` into the new folder ``out_dir``.

    Args:
        model: checkpoint folder, hub id or shipped reference (None: the default model).
        recipe: a `Recipe`, a preset name (``prune-50``…), a YAML path, or a dict.
        data: calibration corpus; ``n_samples`` sequences of ``seq_len`` tokens.
        evaluate: measure perplexity and accuracy on ``eval_data`` before and after, on
            rows of 256 tokens spread over the whole corpus, ``eval_max_tokens`` in all.
        dtype: what the output stores: ``auto`` (the source checkpoint's dtype), ``bfloat16``,
            ``float16`` or ``float32``. Work is done in fp32; the "after" evaluation scores the
            weights rounded to this dtype, exactly as saved.

    Returns:
        The report (also written to ``out_dir/report.json``).

    Raises:
        MoekitError: before any weights load, for an invalid recipe, an unsupported
            model, an existing ``out_dir``; before calibration, for unusable data.
    """
    from moekit.calib.calibrate import calibrate
    from moekit.data.tokens import calibration_tokens, evaluation_stream, tokenizer_for
    from moekit.io.load import default_model, load, stored_dtype
    from moekit.io.save import atomic_dir, cast_for_storage, output_dtype, round_for_storage, write_checkpoint

    start = time.perf_counter()
    name = str(model) if model is not None else default_model()
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        raise MoekitError(f"{out} already exists; moekit never writes into an existing folder. Choose a new one.")
    recipe, config = checked_recipe(name, recipe)
    source = stored_dtype(name)
    stored = output_dtype(dtype, source)
    tok = tokenizer_for(name, tokenizer)
    calib = calibration_tokens(data, tok, n_samples=n_samples, seq_len=seq_len, seed=seed)
    notes = _sample_shortfall(recipe, n_samples, seq_len)
    eval_rows = None
    if evaluate:
        eval_rows = spread_rows(evaluation_stream(eval_data, tok).input_ids, eval_max_tokens,
                                  min(256, getattr(config, "max_position_embeddings", 256) or 256))

    net = load(name)
    report: dict[str, Any] = {"model": name, "recipe": recipe.to_dict(), **calib.describe(),
                              "dtype": str(stored).removeprefix("torch."), "before": summary(net, source),
                              "notes": notes}
    if eval_rows is not None:
        report["before"]["eval"] = _evaluate(net, eval_rows, batch_size, progress)

    stats, stale, step_reports = None, True, []
    for step in recipe.steps:
        if step.needs() and (stats is None or stale):
            hidden = max((s.hidden_sample() for s in recipe.steps), default=0)
            wanted = set().union(*(s.needs() for s in recipe.steps))
            stats = calibrate(net, calib.input_ids, statistics=wanted, hidden_sample=hidden, seed=seed,
                              batch_size=batch_size, progress=progress, meta={"model_name": name, **calib.describe()})
            report.setdefault("calibration", []).append(
                {"statistics": stats.statistics, "seconds": stats.meta["seconds"],
                 "model_fingerprint": stats.meta["model_fingerprint"], "data_fingerprint": stats.meta["data_fingerprint"]})
            stale = False
        step_start = time.perf_counter()
        result = step.apply(net, stats, progress=progress)
        step_reports.append({"type": step.type, "seconds": round(time.perf_counter() - step_start, 3), **result})
        stale = stale or step.changes_structure
    report["steps"] = step_reports
    round_for_storage(net, stored)  # evaluate exactly the weights that are saved
    report["after"] = summary(net, stored)
    if eval_rows is not None:
        report["after"]["eval"] = _evaluate(net, eval_rows, batch_size, progress)
    report["format"] = "moekit-nonuniform" if getattr(net.config, PER_LAYER_KEY, None) else "standard"
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["peak_memory_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    with atomic_dir(out) as tmp:
        write_checkpoint(cast_for_storage(net, stored), tmp)
        tok.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "README.md").write_text(model_card(report))
    report["out"] = str(out)
    return report


def _sample_shortfall(recipe: Recipe, n_samples: int, seq_len: int) -> list[str]:
    """A note when the recipe asks for more calibration inputs per layer than the data holds:
    the steps then fit on every token there is, which is legal but a smaller sample than the
    recipe was tuned with (refit in particular generalises worse on few inputs)."""
    wanted = max((step.hidden_sample() for step in recipe.steps), default=0)
    tokens = n_samples * seq_len
    if wanted <= tokens:
        return []
    return [f"the recipe asks for {wanted:,} calibration inputs per layer but {n_samples} sequences of {seq_len} "
            f"tokens hold {tokens:,}; its steps used all {tokens:,}. Pass --samples "
            f"{math.ceil(wanted / seq_len)} for the full sample."]


def spread_rows(stream: torch.Tensor, max_tokens: int | None, length: int) -> torch.Tensor:
    """Rows [N, length] of ``stream`` [L], at most ``max_tokens`` tokens in all, spread evenly
    over the whole stream: a bounded evaluation that still sees every part of the corpus
    (the first tokens of a corpus are often one unrepresentative file)."""
    from moekit.data.packing import pack

    if stream.numel() < length:
        return stream.view(1, -1)
    rows = pack(stream, length)
    if max_tokens:
        count = max(1, min(rows.shape[0], max_tokens // length))
        rows = rows[torch.linspace(0, rows.shape[0] - 1, count).round().long()]
    return rows


def _evaluate(model: nn.Module, rows: torch.Tensor, batch_size: int, progress: bool) -> dict:
    """Each row is its own window, so every row contributes length − 1 predictions."""
    from moekit.eval.perplexity import evaluate

    length = rows.shape[1]
    result = evaluate(model, rows, batch_size=batch_size, progress=progress, routing=False,
                      context_length=length, stride=max(length - 1, 1))
    return {"perplexity": result.perplexity, "accuracy": result.accuracy, "tokens": result.tokens}


def model_card(report: dict) -> str:
    """A README.md for the output folder: what was done and what it cost."""
    before, after = report["before"], report["after"]
    # one count per layer: a global budget keeps a different number in each
    layers = sorted(before["experts_per_layer"].keys() | after["experts_per_layer"].keys(), key=int)
    lines = [
        f"# {Path(report['model']).name} compressed by moekit",
        "",
        f"Source model: `{report['model']}`. Recipe (also in `recipe.yaml`):",
        "",
        "```yaml",
        Recipe.from_dict(report["recipe"]).to_yaml().rstrip(),
        "```",
        "",
        f"Calibration: {report['data_shape'][0]} sequences of {report['data_shape'][1]} tokens from "
        f"`{report['data_source']}` (fingerprint `{report['data_fingerprint']}`).",
        *(f"Note: {note}" for note in report.get("notes", [])),
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| parameters | {before['total_params']:,} | {after['total_params']:,} |",
        f"| active parameters per token | {before['active_params']:,} | {after['active_params']:,} |",
        f"| bytes as stored (output in {report['dtype']}) | {before['bytes']:,} | {after['bytes']:,} |",
        f"| experts per MoE layer (layers {', '.join(map(str, layers))}) | "
        f"{', '.join(str(before['experts_per_layer'].get(i, '-')) for i in layers)} | "
        f"{', '.join(str(after['experts_per_layer'].get(i, '-')) for i in layers)} |",
    ]
    if "eval" in before:
        lines += [
            f"| perplexity ({before['eval']['tokens']} tokens) | {before['eval']['perplexity']:.3f} | "
            f"{after['eval']['perplexity']:.3f} |",
            f"| next-token accuracy | {before['eval']['accuracy']:.2%} | {after['eval']['accuracy']:.2%} |",
        ]
    lines += ["", "Experts kept in each layer (original ids) are listed in `report.json`.", ""]
    if report["format"] == "standard":
        lines += ["This is a standard checkpoint: `transformers.AutoModelForCausalLM.from_pretrained(folder)` "
                  "loads it without moekit."]
    else:
        lines += ["Layers keep different numbers of experts, which a standard transformers checkpoint cannot "
                  "express. This folder is in moekit's non-uniform format (`moekit.json`, "
                  "`moekit-model.safetensors`): load it with `moekit.load(folder)`."]
    return "\n".join(lines) + "\n"
