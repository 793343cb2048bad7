"""One training run end to end: validate, prepare data, build or load the model, train, save.

`moekit train` and `scripts/train_reference.py` both call `run_training`; everything the
user can get wrong is checked before the first step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from moekit.errors import MoekitError


def run_training(*, arch: str, init: Path | None, data: str, eval_data: str | None, text_field: str,
                 tokenizer: Path | None, vocab_size: int, seq_len: int, out: Path, show_progress: bool,
                 dtype: str = "auto", console=None, **settings) -> dict:
    """Validate everything, prepare data, train, and save ``out/model``. Returns a summary.

    ``settings`` are `TrainConfig` fields, with ``warmup`` for ``warmup_steps``,
    ``bias_update_rate=None`` meaning "1e-3 where routers have a correction bias", and
    ``lr=None`` (or absent) "2e-3 from scratch, 1e-4 with ``init``" (continuing a trained
    model at higher rates made it worse in benchmarks/build.py and combine.py).
    ``dtype`` is what ``out/model`` stores: ``auto`` keeps the ``init`` checkpoint's dtype
    (fp32 from scratch), so healing a bf16 model gives a bf16 model; training is fp32.
    """
    from moekit.io.tokenizer import own_tokenizer_folder, tokenizer_path
    from moekit.io.compressed import refuse_quantized
    from moekit.io.load import check_model, stored_dtype
    from moekit.io.outputs import check_output, missing_folders, writing
    from moekit.io.save import atomic_dir, cast_for_storage, output_dtype, write_checkpoint
    from moekit.train import TrainConfig, build_model, prepare_data
    from moekit.train import train as train_loop
    from moekit.train.checkpoint import latest_state
    from moekit.train.config import BIASED_FAMILIES
    from moekit.train.presets import preset
    from moekit.train.trainer import check_resumable, first_steps

    out = check_output(out, run_folder=True)  # before anything is read: a rerun resumes in it
    made = [*missing_folders(out), out] if not out.exists() else []
    # --init is a folder or any name moekit.load takes; None: a built-in tiny model (no files)
    folder = check_model(str(init)) if init is not None else None
    refuse_quantized(f"--init {init}", folder, doing="training it",
                     fix="Train the unquantized model, then quantize the result with "
                         "`moekit compress RUN/model --recipe w4a16`.")
    stored = output_dtype(dtype, stored_dtype(str(init)) if init is not None else torch.float32)
    config, model = _model_config(arch, init, folder)
    if settings.get("lr") is None:
        settings["lr"] = 1e-4 if init is not None else 2e-3
    bias_rate = settings.pop("bias_update_rate")
    if bias_rate is None:
        bias_rate = 1e-3 if config.model_type in BIASED_FAMILIES else 0.0
    saved = latest_state(out / "checkpoints")
    # Clamped to the step count the run started with, so that raising --steps keeps it.
    warmup = max(0, min(settings.pop("warmup"), (first_steps(saved["log"]) if saved else settings["steps"]) - 1))
    tc = TrainConfig.checked(**settings, warmup_steps=warmup, bias_update_rate=bias_rate)
    if saved is not None:  # before the data is prepared, which takes most of a minute
        check_resumable(out, saved, tc)
    if tokenizer is not None:
        tokenizer = tokenizer_path(tokenizer)
    elif init is not None:
        tokenizer = own_tokenizer_folder(str(init))
    with writing(out, on_failure=lambda: kept_run(out, made)):
        run = prepare_data(data=data, eval_data=eval_data, tokenizer=str(tokenizer) if tokenizer else None,
                           vocab_size=vocab_size, seq_len=seq_len, out_dir=out, text_field=text_field,
                           progress=show_progress, console=console)
        if model is None:
            config.vocab_size = len(run.tokenizer)  # from scratch: the model fits the tokenizer exactly
            model = build_model(config, seed=tc.seed)
        elif len(run.tokenizer) > config.vocab_size:
            raise MoekitError(f"the tokenizer has {len(run.tokenizer)} tokens but the model only {config.vocab_size}; "
                              "use the model's own tokenizer (--tokenizer).")
        meta = {"arch": arch if preset(arch) else str(arch), "init": str(init) if init else None,
                "data": run.info | {"train": None, "eval": None}, "threads": torch.get_num_threads(),
                "params": sum(p.numel() for p in model.parameters())}
        t0 = time.time()
        log = train_loop(model, train_rows=run.train_rows, eval_rows=run.eval_rows, config=tc, out_dir=out,
                         console=console, show_progress=show_progress, meta=meta)
        model_dir = out / "model"
        with atomic_dir(model_dir, replace=True) as tmp:  # a rerun of a finished run writes it again
            # a pruned model with per-layer expert counts stays non-uniform
            write_checkpoint(cast_for_storage(model, stored), tmp)
            run.tokenizer.save_pretrained(tmp)
    history, evals = log["history"], log["evals"]
    return {
        "model_dir": str(model_dir), "steps": len(history), "interrupted": log["interrupted"],
        "already_finished": log["resumed_from"] >= tc.steps,
        "train_loss": history[-1]["loss"] if history else float("nan"),
        "eval_loss": evals[-1]["loss"] if evals else None,
        "eval_perplexity": evals[-1]["perplexity"] if evals else None,
        "unigram_eval_perplexity": run.info.get("unigram_eval_perplexity"),
        "tokens_per_s": sum(h["tokens_per_s"] for h in history[-20:]) / max(1, len(history[-20:])),
        "wall_s": time.time() - t0, "train_seconds_all_sessions": sum(h["seconds"] for h in history), "params": meta["params"], "log": str(out / "train_log.json"),
    }


def _model_config(arch: str, init: Path | None, folder: Path | None):
    from transformers import AutoModelForCausalLM

    from moekit.io.load import load, load_config
    from moekit.io.layered import read_whole
    from moekit.io.nonuniform import is_nonuniform
    from moekit.train import FAMILIES, check_config, load_model_config
    from moekit.train.config import DENSE_FAMILIES
    from moekit.train.presets import preset

    if init is not None:
        model_type = load_config(str(init)).model_type
        if model_type not in FAMILIES and model_type not in DENSE_FAMILIES:  # before its weights load
            raise MoekitError(f"--init {init} is a {model_type} model; moekit trains "
                              f"{', '.join([*FAMILIES, *sorted(DENSE_FAMILIES)])} models.")
        if folder is None:
            model = load(str(init))
            return check_config(model.config), model
        if is_nonuniform(folder):  # e.g. healing a model pruned with a global budget
            model = read_whole(folder, experts_implementation="grouped_mm")
            return check_config(model.config), model
        config = load_model_config(json.loads((folder / "config.json").read_text()))
        experts = {} if model_type in DENSE_FAMILIES else {"experts_implementation": "grouped_mm"}
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                     use_safetensors=True, **experts)
        return check_config(model.config), model
    spec = preset(arch)
    return load_model_config(spec if spec is not None else _arch_file(arch)), None


def _arch_file(arch: str) -> Path:
    path = Path(arch)
    if not path.is_file():
        from moekit.train import FAMILIES
        from moekit.train.presets import REFERENCE

        raise MoekitError(f"unknown architecture {arch!r}; use a family ({', '.join(FAMILIES)}), "
                          f"a preset ({', '.join(REFERENCE)}) or a YAML/JSON config file.")
    return path


def kept_run(out: Path, made: list[Path]) -> str:
    """After a failed write: delete what is half-written, keep what a rerun resumes from (the
    prepared data, complete checkpoints) and say so; a run folder this run created that
    holds nothing to resume from is removed (``made``: it and the folders made above it)."""
    import shutil

    from moekit.io.outputs import folder_size, remove_empty, remove_partial, size_text
    from moekit.train.checkpoint import list_checkpoints

    if not out.is_dir():
        return ""
    remove_partial(out)
    for tmp in out.glob("checkpoints/.tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in out.glob(".model.partial-*"):  # `atomic_dir`'s, when its own clean-up was cut short
        shutil.rmtree(tmp, ignore_errors=True)
    prepared = (out / "data" / "manifest.json").is_file()
    if not prepared:  # written before the manifest: prepared again by a rerun
        for name in ("data", "tokenizer"):
            shutil.rmtree(out / name, ignore_errors=True)
    checkpoints = list_checkpoints(out / "checkpoints")
    if not checkpoints and not prepared and made:
        shutil.rmtree(out, ignore_errors=True)
        remove_empty(made[:-1])
        return f"Nothing could be resumed, so the run folder {out} was removed."
    if not checkpoints and not prepared:
        return f"Nothing could be resumed from {out}."
    kept = f"its checkpoint at step {int(checkpoints[-1].name.removeprefix('step-'))}" if checkpoints \
        else "its prepared data"
    return (f"The run folder {out} keeps {kept} ({size_text(folder_size(out))}): rerun the same command to continue "
            f"from there, or delete that folder.")
