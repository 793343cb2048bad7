"""The chapters of a compress (`moekit.compression.compress`): prepare the job (every check,
dtypes and tokens; no weight read), open the ranked work folder, report before, plan,
apply the recipe in one streamed pass, report after, save."""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.arch.layout import FACTORED_KEY, POLICY_KEY
from moekit.arch.summary import summary, with_routing_policy
from moekit.distributed import current
from moekit.distributed.runs import agree_compress, agree_progress, pass_done, rank_work_path, remove_rank_folders
from moekit.errors import MoekitError
from moekit.io.card import model_card, plain_transformers
from moekit.io.compressed import ledger
from moekit.io.layered import LayeredModel
from moekit.io.shards import OUTER, ShardWriter
from moekit.progress import phase, progress_bar
from moekit.recipe import Recipe
from moekit.recipe.decisions import check_given, needs_native_format, plan_passes
from moekit.recipe.passes import PassResult, RecipePass
from moekit.recipe.phases import Phase, phases_of
from moekit.recipe.recipe import checked_recipe


@dataclass
class Run:
    """What the ranked work folder holds while a compress runs: the folder, the activation
    budget, and what the pass left (the plans, the model, its writer — None on a rank that
    does not write — and the pass's result)."""

    work: Any = None
    budget: Any = None
    plans: dict | None = None
    lent: LayeredModel | None = None
    native: bool = False
    writer: ShardWriter | None = None
    runner: RecipePass | None = None
    result: PassResult | None = None
    parts: list[int] | None = None


@dataclass
class Job:
    """A compress, checked and prepared: everything decided before the first weight of a
    decoder layer is read."""

    name: str
    out: Path
    recipe: Recipe
    phases: list[Phase]
    source: torch.dtype  # what the input checkpoint stores
    stored: torch.dtype  # what the output stores
    compute: torch.dtype
    where: torch.device
    budget_bytes: int | None
    tokenizer: Any
    calib: Any  # `moekit.data.tokens.TokenData`
    eval_rows: torch.Tensor | None
    notes: list[str]
    lent: LayeredModel
    world: Any
    given: Any
    facts: dict
    stats: str | None
    settings: dict  # batch_size, seed, progress, max_shard_size
    start: float

    @classmethod
    def prepare(cls, model, recipe, *, out_dir, data, n_samples, seq_len, seed, tokenizer, text_field, evaluate,
                eval_data, eval_max_tokens, batch_size, dtype, device, compute_dtype, activation_budget, stats,
                max_shard_size, dequantize, progress) -> Job:
        """Every check a compress makes before it writes anything: the output, the recipe
        against the config, the input's dtype and quantization, devices, the data, every
        shard and tensor shape (the skeleton is opened: non-layer weights only), the
        statistics given, and that all ranks run the same job."""
        from moekit.data.tokens import calibration_tokens, evaluation_stream
        from moekit.io.tokenizer import tokenizer_for
        from moekit.devices import parse_bytes, resolve_compute_dtype, resolve_device
        from moekit.eval.rows import spread_rows
        from moekit.io.load import default_model, open_model, quantized_source, stored_dtype
        from moekit.io.outputs import check_output
        from moekit.io.save import output_dtype

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
            calib = calibration_tokens(data, tok, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                       text_field=text_field)
            eval_rows = None
            if evaluate:
                row_length = min(256, getattr(config, "max_position_embeddings", 256) or 256)
                eval_rows = spread_rows(evaluation_stream(eval_data, tok, text_field=text_field).input_ids,
                                        eval_max_tokens, row_length)
        lent = open_model(name, dtype=compute, device=where)  # checks every shard and tensor shape
        phases = phases_of(recipe)
        world = current()  # under torchrun: this rank pushes its share of the rows, rank 0 writes
        given = check_given(stats, lent, calib.input_ids, phases[0]) if stats is not None else None
        facts = _run_facts(name, lent, recipe, calib, seed=seed, batch_size=batch_size, dtype=stored,
                           compute_dtype=compute, device=where, stats=given and given.meta["model_fingerprint"],
                           **({"ranks": world.size} if world is not None else {}))  # a rank's work: its share
        agree_compress({**facts, "evaluate": eval_rows is not None}, lent, world)
        return cls(name, out, recipe, phases, source, stored, compute, where, budget_bytes, tok, calib, eval_rows,
                   dequantized + _sample_shortfall(recipe, n_samples, seq_len), lent, world, given, facts, stats,
                   {"batch_size": batch_size, "seed": seed, "progress": progress, "max_shard_size": max_shard_size},
                   start)

    def fresh(self) -> LayeredModel:
        """The model as the checkpoint holds it (each pass edits its own skeleton)."""
        from moekit.io.load import open_model

        return open_model(self.name, dtype=self.compute, device=self.where)

    @contextmanager
    def ranked_work(self, *, resume: bool, on_start=None) -> Iterator[Run]:
        """The work folder of this rank, agreed with the others (which layers are done), and
        the activation budget inside it. A write that fails (a full disk) keeps the finished
        layers for ``--resume``, or leaves nothing (`moekit.io.outputs.writing`)."""
        from moekit.calib.activations import ActivationBudget
        from moekit.io.outputs import missing_folders, remove_empty, writing
        from moekit.io.workdir import WorkFolder, work_folder_for

        work_path, made, run = rank_work_path(work_folder_for(self.out), self.world), missing_folders(self.out), Run()

        def kept() -> str:
            said = run.work.keep_or_remove() if run.work is not None else ""
            remove_empty(made)
            return said

        with writing(self.out, partial=[work_path], on_failure=kept):
            run.work = WorkFolder(work_path, self.facts, resume=resume)
            agree_progress(run.work, self.world)
            if on_start is not None and (self.world is None or self.world.main):
                on_start(run.work)
            run.budget = ActivationBudget(self.budget_bytes, run.work.path / "activations")
            yield run

    @property
    def stats_meta(self) -> dict:
        return {"model_name": self.name, **self.calib.describe()}

    def report_before(self, run: Run) -> dict[str, Any]:
        report: dict[str, Any] = {"model": self.name, "recipe": self.recipe.to_dict(), **self.calib.describe(),
                                  "dtype": str(self.stored).removeprefix("torch."),
                                  "before": summary(self.lent.model, self.source, self.lent.checkpoint),
                                  "notes": self.notes, "device": str(self.where),
                                  "compute_dtype": str(self.compute).removeprefix("torch.")}
        if self.eval_rows is not None:
            report["before"]["eval"] = self._evaluate(self.lent)
        return report

    def plan(self, run: Run) -> None:
        s = self.settings
        run.plans = plan_passes(run.work, self.fresh, self.calib.input_ids, self.phases, batch_size=s["batch_size"],
                                seed=s["seed"], budget=run.budget, stats_meta=self.stats_meta,
                                progress=s["progress"], given=self.given)

    def apply(self, run: Run, *, on_layer=None) -> None:
        """The editing pass: every layer calibrated, edited by the steps and written to the
        work folder's shards (by rank 0; the other ranks compute their share)."""
        s, lent = self.settings, self.fresh()
        native = needs_native_format(lent.model, self.recipe, run.plans)
        if native and any(step.type == "quantize" for step in self.recipe.steps):
            raise MoekitError("this recipe's output needs moekit's own format (different expert counts or top-k "
                              "per layer, or MoE sublayers dropped), which cannot also be quantized yet; before "
                              "quantize, use budget: uniform, one top-k for all layers, and drop_blocks rather than "
                              "drop_layers.")
        ledger(lent.model, scale_dtype=self.stored)  # scales are rounded to the dtype they are saved in
        writes = self.world is None or self.world.main
        run.lent, run.native = lent, native
        run.writer = ShardWriter(run.work.path, lent.model, dtype=self.stored, native=native) if writes else None
        run.runner = RecipePass(lent, self.calib.input_ids, self.phases, plans=run.plans, batch_size=s["batch_size"],
                                seed=s["seed"], budget=run.budget, stats_meta=self.stats_meta, given=self.given)
        batches, phases = len(run.runner.streamer.batches), len(self.phases)
        with progress_bar("compressing", total=len(lent) * batches * phases, unit="batch",
                          enabled=s["progress"]) as advance:
            if run.work.resumed:
                advance((run.work.finished_layers()[-1] + 1) * batches * phases, "resumed")
            run.result = run.runner.run(writer=run.writer, work=run.work, advance=advance, on_layer=on_layer)
        pass_done(self.world)
        if run.writer is not None:  # the embeddings, final norm and head, after every layer
            run.writer.write_outer(f"{lent.layers_path}.")
        dropped = run.runner.dropped_blocks()
        run.parts = [i for i in range(len(lent)) if i not in dropped]  # the output's shards, in order

    def report_after(self, report: dict[str, Any], run: Run) -> None:
        """The output's structure (fewer blocks when some were dropped), each phase's
        calibration, each step's report, sizes after, and the format (a quantized output's, and
        who loads it, once `save` has written it)."""
        lent, result, plans = run.lent, run.result, run.plans
        dropped = sorted(run.runner.dropped_blocks())
        if dropped:  # the skeleton (and the config written) as the output holds it: fewer layers
            from moekit.arch.edit import drop_blocks

            drop_blocks(lent.model, dropped)
        report["calibration"] = [
            {"statistics": sorted(phase.wanted), "seconds": round(result.seconds[p], 3),
             "model_fingerprint": result.digests[p].hexdigest(),
             "data_fingerprint": self.calib.describe()["data_fingerprint"],
             **({"read_from": str(Path(self.stats).resolve())} if p == 0 and self.given is not None else {})}
            for p, phase in enumerate(self.phases)]
        report["steps"] = [{"type": step.type, **step.report_plan(plans.get(position)),
                            **step.report(result.per_layer.get(position, {}))}
                           for position, step in enumerate(self.recipe.steps)]
        report["notes"] += [f"quantize: the bit allocation is not proven optimal (the solver stopped at its "
                            f"{s['allocation']['time_limit_s']:g} s limit): its total error is at most "
                            f"{s['allocation']['mip_gap']:.2%} above the optimum's."
                            for s in report["steps"] if "allocation" in s and not s["allocation"]["proven_optimal"]]
        report["after"] = with_routing_policy(summary(lent.model, self.stored), lent.model, report["steps"])
        factored = getattr(lent.model.config, FACTORED_KEY, None)  # the config the output is written with
        report["format"] = ("moekit-factored" if factored else "moekit-nonuniform" if run.native
                            else "standard")  # a quantized output's format is known once written (`save`)
        report["activations"] = run.budget.report()
        run.budget.close()

    def save(self, report: dict[str, Any], run: Run, *, on_file=None) -> None:
        """The output folder, whole or not at all: shards, tokenizer, the "after" evaluation
        of exactly what was written, recipe, report and card; then the work folders go."""
        from moekit.devices import parse_bytes
        from moekit.io.save import atomic_dir

        shard_size = parse_bytes(self.settings["max_shard_size"])
        with atomic_dir(self.out) as tmp:
            written = run.writer.finish(tmp, [*run.parts, OUTER], max_shard_size=shard_size, on_file=on_file)
            if any(step.type == "quantize" for step in self.recipe.steps):  # the model in memory holds floats
                from moekit.io.checkpoint import Checkpoint

                report["after"]["bytes"] = Checkpoint(tmp, files=[p.name for p in written]).stored_bytes
                if not run.native:  # the writer names the weights moekit's when transformers would read them wrongly
                    mixed = any(p.name.startswith("moekit-model") for p in written)
                    report["format"] = "compressed-tensors-mixed" if mixed else "compressed-tensors"
            routing_policy = bool(getattr(run.lent.model.config, POLICY_KEY, None))
            report["plain_transformers"] = plain_transformers(report["format"], routing_policy=routing_policy)
            self.tokenizer.save_pretrained(tmp)
            if self.eval_rows is not None:
                saved = LayeredModel.from_checkpoint(tmp, dtype=self.compute, device=self.where)
                report["after"]["eval"] = self._evaluate(saved, shard=False)  # rank 0 alone
            report["seconds"] = round(time.perf_counter() - self.start, 2)
            report["peak_memory_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            (tmp / "recipe.yaml").write_text(self.recipe.to_yaml())
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            (tmp / "README.md").write_text(model_card(report))
        run.work.remove()
        remove_rank_folders(run.work.path)

    def _evaluate(self, model, shard: bool = True) -> dict:
        from moekit.eval.rows import evaluate_rows

        return evaluate_rows(model, self.eval_rows, self.settings["batch_size"], self.settings["progress"], shard=shard)


def _run_facts(name: str, lent, recipe: Recipe, calib, **settings) -> dict:
    """Everything a compress's output depends on: a work folder is resumed only when all
    of it is the same (a checkpoint replaced in place changes its files' sizes and times).
    Named as a refused resume names what differs (`moekit.io.workdir`)."""
    from moekit.version import installed_version

    checkpoint = lent.checkpoint.fingerprint() if lent.checkpoint is not None else name
    return {"model": name, "checkpoint files": checkpoint, "recipe": recipe.to_dict(),
            "calibration data": calib.describe()["data_fingerprint"], "moekit version": installed_version(),
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
