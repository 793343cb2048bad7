"""`moekit.compress`: check the recipe, calibrate once, run the steps, save, report.

The model streams one decoder layer at a time (`moekit.recipe.passes`): each layer is
read, calibrated with exactly the statistics the steps declare, edited, written as its
own shard and released. A step that follows a structural change and needs statistics
reads a calibration of the changed model (a second stream of hidden states in the same
pass). Finished layers are kept in a work folder next to the output, so an interrupted
run resumes (`moekit.io.workdir`). The output folder appears only when complete: a
standard sharded checkpoint (or moekit's non-uniform format), the tokenizer,
``recipe.yaml`` as run, ``report.json`` and a model card.
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

from moekit.arch.adapters import FAMILIES, not_an_moe
from moekit.arch.summary import summarize
from moekit.distributed import current
from moekit.distributed.runs import agree_compress, agree_progress, pass_done, rank_work_path, remove_rank_folders
from moekit.errors import MoekitError
from moekit.io.compressed import ledger
from moekit.io.layered import LayeredModel
from moekit.io.shards import OUTER, ShardWriter
from moekit.io.card import model_card, plain_transformers
from moekit.progress import phase, progress_bar
from moekit.recipe import ModelInfo, Recipe, load_recipe
from moekit.recipe.passes import RecipePass, check_given, needs_native_format, phases_of, plan_passes


def model_info(config: Any) -> ModelInfo:
    """Experts, top-k and groups from a config alone (recipes are checked before loading)."""
    model_type = getattr(config, "model_type", None)
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if family is None:
        raise MoekitError(not_an_moe(model_type, f"model_type {model_type!r}"))
    top_k = int(getattr(config, family.top_k_key))
    spec = family.routing.resolve(config, top_k)
    return ModelInfo(family=family.name, num_experts=int(getattr(config, family.num_experts_key)),
                     top_k=top_k, routing=spec, config=config)


def checked_recipe(name: str, recipe: Recipe | str | os.PathLike | dict) -> tuple[Recipe, Any]:
    """The recipe, checked step by step against ``name``'s config (no weights read), each
    step against the expert count the steps before it leave; returns it with that config."""
    from moekit.io.load import load_config

    from moekit.arch.factored import FACTORED_KEY

    recipe = load_recipe(recipe)
    config = load_config(name)
    info = model_info(config)
    factored = bool(getattr(config, FACTORED_KEY, None))  # experts held as factors edit no further
    for position, step in enumerate(recipe.steps):
        try:
            if factored and step.type in ("prune", "merge", "quantize", "decompose"):
                raise MoekitError(f"{step.type} cannot follow decompose: factored experts are not edited further. "
                                  f"Put {step.type} before decompose, or give decompose materialize: true.")
            step.check(info)
        except MoekitError as exc:  # named as the recipe's own validation names a step (each check says its type)
            raise MoekitError(f"{recipe.where(position)}: {str(exc).removeprefix(f'{step.type}: ')}") from None
        factored = factored or (step.type == "decompose" and not step.materialize)
        top_k = step.top_k_after(info.top_k)
        info = dataclasses.replace(info, num_experts=step.kept_per_layer(info.num_experts),  # what the next sees
                                   top_k=top_k, routing=dataclasses.replace(info.routing, top_k=top_k))
    return recipe, config


def summary(model: nn.Module, stored: torch.dtype, checkpoint=None) -> dict:
    """Sizes for reports: parameters (total, active per token, routed), bytes as stored in
    ``stored`` (or, given the `Checkpoint` the model was read from, as that checkpoint
    stores them: a quantized input's packed bytes, not its dequantized floats), experts
    per MoE layer."""
    s = summarize(model, stored_dtype=stored)
    moe = [l for l in s.layers if l.kind == "moe"]
    return {"total_params": s.total_params, "active_params": s.active_params, "routed_params": s.routed_params,
            "bytes": checkpoint.stored_bytes if checkpoint is not None else s.total_bytes,
            "experts_per_layer": {str(l.index): l.num_experts for l in moe},
            "experts_per_token": sum(l.top_k for l in moe) / len(moe) if moe else 0.0}  # mean top-k over MoE layers


def with_routing_policy(sizes: dict, model: nn.Module, steps: list[dict]) -> dict:
    """``sizes`` (`summary`) of a model whose last ``routing_policy`` step (its report in
    ``steps``) computes fewer experts per token than top-k: ``experts_per_token`` becomes the
    mean the policy kept on the calibration tokens, ``active_params_with_policy`` the mean
    parameters per token that follow (``active_params`` stays at the full top-k), both None
    when the policy's parameter was given rather than calibrated (nothing was measured)."""
    policy = getattr(model.config, "moekit_routing_policy", None)
    step = next((s for s in reversed(steps) if s["type"] == "routing_policy"), None)
    if step is None or not policy:
        return sizes
    measured = {int(i): v for i, v in (step.get("experts_per_token") or {}).items()}
    sizes = {**sizes, "routing_policy": policy["kind"], "experts_per_token": None, "active_params_with_policy": None}
    layers = [l for l in summarize(model).layers if l.kind == "moe"]
    if measured and all(l.index in measured for l in layers):
        sizes["experts_per_token"] = round(sum(measured[l.index] for l in layers) / len(layers), 4)
        saved = sum(l.routed_params * (l.top_k - measured[l.index]) / l.num_experts for l in layers)
        sizes["active_params_with_policy"] = round(sizes["active_params"] - saved)
    return sizes


def quantized_source(name: str, dequantize: bool, stored: torch.dtype) -> list[str]:
    """A quantized (compressed-tensors) input is refused before any work unless
    ``dequantize``: it is read dequantized, so the output would silently store floats.
    With ``dequantize``, the note that the CLI, ``report.json`` and the card carry."""
    from moekit.io.compressed import quantized_input, refuse_quantized
    from moekit.io.load import resolve_folder

    folder = resolve_folder(name)
    if not dequantize:
        refuse_quantized(name, folder, doing="compressing it",
                         fix="Compress the unquantized model it was made from with a recipe that ends in quantize "
                             "(e.g. --recipe prune-50-w4), or pass --dequantize (Python: dequantize=True) to write "
                             "dequantized weights on purpose.")
        return []
    described = quantized_input(folder)
    if described is None:
        return []
    return [f"the input is a quantized checkpoint ({described}), read dequantized (--dequantize): the output "
            f"stores {str(stored).removeprefix('torch.')} weights, not the input's quantized ones, unless the "
            "recipe quantizes them again; \"before\" counts the input's bytes as stored."]


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
    text_field: str = "text",
    evaluate: bool = False,
    eval_data: str = "stdlib:eval",
    eval_max_tokens: int | None = 32768,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    compute_dtype: str = "auto",
    activation_budget: int | str | None = None,
    resume: bool = False,
    stats: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    dequantize: bool = False,
    progress: bool = True,
    on_start=None,
    on_event=None,
) -> dict:
    """Compress ``model`` with ``recipe`` into the new folder ``out_dir``, one decoder layer
    at a time: each layer is read from the checkpoint, calibrated, edited by the recipe's
    steps, written to the output as its own shard and released, so the memory needed is
    set by one layer (see README, "Memory"), not by the model.

    Args:
        model: checkpoint folder, hub id or shipped reference (None: the default model).
        recipe: a `Recipe`, a preset name (``prune-50``…), a YAML path, or a dict.
        data: calibration corpus; ``n_samples`` sequences of ``seq_len`` tokens.
        text_field: the field of .jsonl/.parquet/hub rows that holds the text (both corpora).
        evaluate: measure perplexity and accuracy on ``eval_data`` before and after, on
            rows of 256 tokens spread over the whole corpus, ``eval_max_tokens`` in all.
        dtype: what the output stores: ``auto`` (the source checkpoint's dtype), ``bfloat16``,
            ``float16`` or ``float32``. The "after" evaluation reads the output as saved.
        device: where layers compute (``auto``: a GPU when there is one).
        compute_dtype: ``auto`` (fp32 on CPU, bf16 on GPU), or a dtype name.
        activation_budget: bytes (or ``"4GiB"``) of calibration hidden states held in
            memory; above it they live in files in the work folder.
        resume: continue the work folder an interrupted run left next to ``out_dir``
            (without it, an existing work folder is refused).
        stats: a folder `moekit calibrate` wrote, for this model and this data (the same
            ``data``, ``n_samples``, ``seq_len`` and ``seed``): the first calibration is
            read from it instead of computed. Refused, naming what differs, when it was
            made for another model or data or lacks a statistic the recipe needs.
        max_shard_size: an output up to this size is one ``model.safetensors``; a bigger
            one is written as one shard per decoder layer with an index.
        dequantize: accept a quantized (compressed-tensors) input, read dequantized: the
            output stores floats (unless the recipe quantizes again), and the report says
            so. Without it such an input is refused before any work.
        on_start: called with the `WorkFolder` once it exists (the CLI prints its path).
        on_event: called with ("layer", index) when a decoder layer is finished and kept
            in the work folder, and ("saved", n) when the n-th output file is in place.

    Returns:
        The report (also written to ``out_dir/report.json``).

    Raises:
        MoekitError: before any weights load, for an invalid recipe, an unsupported
            model, an ``out_dir`` that exists or cannot be created, a work folder of
            another run; before calibration, for unusable data.
        WriteFailed: a write failed while the work ran (a full disk): the finished layers
            stay in the work folder for ``resume`` (the message says where), the rest is
            removed.
    """
    from moekit.calib.activations import ActivationBudget
    from moekit.data.tokens import calibration_tokens, evaluation_stream, tokenizer_for
    from moekit.devices import parse_bytes, resolve_compute_dtype, resolve_device
    from moekit.io.layered import open_model
    from moekit.io.load import default_model, stored_dtype
    from moekit.io.outputs import check_output, missing_folders, remove_empty, writing
    from moekit.io.save import atomic_dir, output_dtype
    from moekit.io.workdir import WorkFolder, work_folder_for

    start = time.perf_counter()
    name = str(model) if model is not None else default_model()
    out = check_output(out_dir)  # before anything is read
    recipe, config = checked_recipe(name, recipe)
    source = stored_dtype(name)
    stored = output_dtype(dtype, source)
    dequantized = quantized_source(name, dequantize, stored)
    where = resolve_device(device)
    compute = resolve_compute_dtype(compute_dtype, where)
    budget_bytes = parse_bytes(activation_budget)
    tok = tokenizer_for(name, tokenizer)
    with phase(f"tokenizing {data}" + (f" and {eval_data}" if evaluate else ""), enabled=progress):
        calib = calibration_tokens(data, tok, n_samples=n_samples, seq_len=seq_len, seed=seed, text_field=text_field)
        eval_rows = None
        if evaluate:
            eval_rows = spread_rows(evaluation_stream(eval_data, tok, text_field=text_field).input_ids,
                                    eval_max_tokens, min(256, getattr(config, "max_position_embeddings", 256) or 256))
    notes = dequantized + _sample_shortfall(recipe, n_samples, seq_len)

    def fresh():
        return open_model(name, dtype=compute, device=where)

    lent = fresh()  # checks every shard and tensor shape before anything is written
    phases = phases_of(recipe)
    world = current()  # under torchrun: this rank pushes its share of the rows, rank 0 writes
    given = check_given(stats, lent, calib.input_ids, phases[0]) if stats is not None else None
    facts = _run_facts(name, lent, recipe, calib, seed=seed, batch_size=batch_size, dtype=stored,
                       compute_dtype=compute, device=where, stats=given and given.meta["model_fingerprint"],
                       **({"ranks": world.size} if world is not None else {}))  # a rank's work holds its share of rows
    agree_compress({**facts, "evaluate": eval_rows is not None}, lent, world)
    work_path, work, made = rank_work_path(work_folder_for(out), world), None, missing_folders(out)

    def kept() -> str:  # a write that failed keeps the finished layers for --resume, or leaves nothing
        said = work.keep_or_remove() if work is not None else ""
        remove_empty(made)
        return said

    with writing(out, partial=[work_path], on_failure=kept):
        work = WorkFolder(work_path, facts, resume=resume)
        agree_progress(work, world)
        if on_start is not None and (world is None or world.main):
            on_start(work)
        budget = ActivationBudget(budget_bytes, work.path / "activations")
        report: dict[str, Any] = {"model": name, "recipe": recipe.to_dict(), **calib.describe(),
                                  "dtype": str(stored).removeprefix("torch."), "before": summary(lent.model, source, lent.checkpoint),
                                  "notes": notes, "device": str(where),
                                  "compute_dtype": str(compute).removeprefix("torch.")}
        if eval_rows is not None:
            report["before"]["eval"] = _evaluate(lent, eval_rows, batch_size, progress)

        stats_meta = {"model_name": name, **calib.describe()}
        plans = plan_passes(work, fresh, calib.input_ids, phases, batch_size=batch_size, seed=seed, budget=budget,
                       stats_meta=stats_meta, progress=progress, given=given)
        lent = fresh()
        native = needs_native_format(lent.model, recipe, plans)
        if native and any(step.type == "quantize" for step in recipe.steps):
            raise MoekitError("this recipe's output needs moekit's own format (different expert counts or top-k "
                              "per layer, or MoE sublayers dropped), which cannot also be quantized yet; before "
                              "quantize, use budget: uniform, one top-k for all layers, and drop_blocks rather than "
                              "drop_layers.")
        ledger(lent.model, scale_dtype=stored)  # scales are rounded to the dtype they are saved in
        writer = (ShardWriter(work.path, lent.model, dtype=stored, native=native) if world is None or world.main
                  else None)
        runner = RecipePass(lent, calib.input_ids, phases, plans=plans, batch_size=batch_size, seed=seed,
                            budget=budget, stats_meta=stats_meta, given=given)
        total = len(lent) * len(runner.streamer.batches) * len(phases)
        with progress_bar("compressing", total=total, unit="batch", enabled=progress) as advance:
            if work.resumed:
                advance((work.finished_layers()[-1] + 1) * len(runner.streamer.batches) * len(phases), "resumed")
            result = runner.run(writer=writer, work=work, advance=advance, on_layer=on_event and
                                (lambda i: on_event("layer", i)))
        pass_done(world)
        if writer is None:  # another rank: its share is done, rank 0 writes the output
            budget.close()
            return {**report, "rank": world.rank, "out": None}
        writer.write_outer(f"{lent.layers_path}.")
        dropped = sorted(runner.dropped_blocks())
        parts = [i for i in range(len(lent)) if i not in dropped]
        if dropped:  # the skeleton (and the config written) as the output holds it: fewer layers
            from moekit.arch.edit import drop_blocks

            drop_blocks(lent.model, dropped)
        report["calibration"] = [
            {"statistics": sorted(phase.wanted), "seconds": round(result.seconds[p], 3),
             "model_fingerprint": result.digests[p].hexdigest(),
             "data_fingerprint": calib.describe()["data_fingerprint"],
             **({"read_from": str(Path(stats).resolve())} if p == 0 and given is not None else {})}
            for p, phase in enumerate(phases)]
        report["steps"] = [{"type": step.type, **step.report_plan(plans.get(position)),
                            **step.report(result.per_layer.get(position, {}))}
                           for position, step in enumerate(recipe.steps)]
        report["notes"] += [f"quantize: the bit allocation is not proven optimal (the solver stopped at its "
                            f"{s['allocation']['time_limit_s']:g} s limit): its total error is at most "
                            f"{s['allocation']['mip_gap']:.2%} above the optimum's."
                            for s in report["steps"] if "allocation" in s and not s["allocation"]["proven_optimal"]]
        report["after"] = with_routing_policy(summary(lent.model, stored), lent.model, report["steps"])
        from moekit.arch.factored import FACTORED_KEY

        factored = getattr(lent.model.config, FACTORED_KEY, None)  # the config the output is written with
        report["format"] = ("moekit-factored" if factored else "moekit-nonuniform" if native
                            else "standard")  # a quantized output's format is known once written (below)
        report["plain_transformers"] = plain_transformers(report["format"], routing_policy=bool(
            getattr(lent.model.config, "moekit_routing_policy", None)))
        report["activations"] = budget.report()
        budget.close()

        with atomic_dir(out) as tmp:
            written = writer.finish(tmp, [*parts, OUTER], max_shard_size=parse_bytes(max_shard_size),
                                    on_file=on_event and (lambda n: on_event("saved", n)))
            if any(step.type == "quantize" for step in recipe.steps):  # the model in memory holds floats
                from moekit.io.checkpoint import Checkpoint

                report["after"]["bytes"] = Checkpoint(tmp, files=[p.name for p in written]).stored_bytes
                if not native:  # the writer names the weights moekit's when transformers would read them wrongly
                    mixed = any(p.name.startswith("moekit-model") for p in written)
                    report["format"] = "compressed-tensors-mixed" if mixed else "compressed-tensors"
                    report["plain_transformers"] = plain_transformers(report["format"], routing_policy=bool(
                        getattr(lent.model.config, "moekit_routing_policy", None)))
            tok.save_pretrained(tmp)
            if eval_rows is not None:
                saved = LayeredModel.from_checkpoint(tmp, dtype=compute, device=where)
                report["after"]["eval"] = _evaluate(saved, eval_rows, batch_size, progress, shard=False)  # rank 0 alone
            report["seconds"] = round(time.perf_counter() - start, 2)
            report["peak_memory_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            (tmp / "recipe.yaml").write_text(recipe.to_yaml())
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            (tmp / "README.md").write_text(model_card(report))
        work.remove()
        remove_rank_folders(work.path)
    report["out"] = str(out)
    return report


def _run_facts(name: str, lent, recipe: Recipe, calib, **settings) -> dict:
    """Everything a compress's output depends on: a work folder is resumed only when all
    of it is the same (a checkpoint replaced in place changes its files' sizes and times).
    Named as a refused resume names what differs (`moekit.io.workdir`)."""
    from moekit import __version__

    checkpoint = lent.checkpoint.fingerprint() if lent.checkpoint is not None else name
    return {"model": name, "checkpoint files": checkpoint, "recipe": recipe.to_dict(),
            "calibration data": calib.describe()["data_fingerprint"], "moekit version": __version__,
            "torch version": torch.__version__, **{k: str(v).removeprefix("torch.") for k, v in settings.items()}}


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


def _evaluate(model, rows: torch.Tensor, batch_size: int, progress: bool, shard: bool = True) -> dict:
    """Each row is its own window, so every row contributes length − 1 predictions
    (``shard``: shared out among torch.distributed ranks, when there are several)."""
    from moekit.eval.perplexity import evaluate

    length = rows.shape[1]
    result = evaluate(model, rows, batch_size=batch_size, progress=progress, routing=False,
                      context_length=length, stride=max(length - 1, 1), shard=shard)
    return {"perplexity": result.perplexity, "accuracy": result.accuracy, "tokens": result.tokens,
            "rows": rows.shape[0], "row_length": length}
