"""`moekit.compress`: check the recipe, calibrate once, run the steps, save, report.

The model streams one decoder layer at a time (`moekit.recipe.passes`): each layer is
read, calibrated with exactly the statistics the steps declare, edited, written as its
own shard and released. A step that follows a structural change and needs statistics
reads a calibration of the changed model (a second stream of hidden states in the same
pass). Finished layers are kept in a work folder next to the output, so an interrupted
run resumes (`moekit.io.workdir`). The output folder appears only when complete: a
standard sharded checkpoint (or moekit's non-uniform format), the tokenizer,
``recipe.yaml`` as run, ``report.json`` and a model card.

`compress` reads as the story of a run; each chapter is a method of `Job`
(`moekit.compression.job`).
"""

from __future__ import annotations

import os

from moekit.recipe import Recipe


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
    set by one layer (see docs/bigger-than-memory.md, "What a run needs"), not by the model.

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
    from moekit.compression.job import Job

    job = Job.prepare(model, recipe, out_dir=out_dir, data=data, n_samples=n_samples, seq_len=seq_len, seed=seed,
                      tokenizer=tokenizer, text_field=text_field, evaluate=evaluate, eval_data=eval_data,
                      eval_max_tokens=eval_max_tokens, batch_size=batch_size, dtype=dtype, device=device,
                      compute_dtype=compute_dtype, activation_budget=activation_budget, stats=stats,
                      max_shard_size=max_shard_size, dequantize=dequantize, progress=progress)  # no weight read yet
    with job.ranked_work(resume=resume, on_start=on_start) as run:  # ranks agree; a failed write keeps or cleans
        report = job.report_before(run)
        job.plan(run)  # the steps' cross-layer decisions: planning passes, or the ones a resumed run took
        job.apply(run, on_layer=on_event and (lambda i: on_event("layer", i)))
        if run.writer is None:  # another rank: its share is done, rank 0 writes the output
            run.budget.close()
            return {**report, "rank": job.world.rank, "out": None}
        job.report_after(report, run)
        job.save(report, run, on_file=on_event and (lambda n: on_event("saved", n)))
    report["out"] = str(job.out)
    return report


__all__ = ["compress"]
