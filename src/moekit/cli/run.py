"""`moekit run [MODEL] --prompt ... --expert-memory SIZE`: generate with offloaded experts.

Thin over `moekit.offload`: the routed experts stay in the checkpoint's files (or CPU
memory for a GPU device) and only ``--expert-memory`` of them are resident; tokens stream
to the terminal as they are generated, then the run's numbers: tokens/s (the whole
generation, and decode alone after the first token), cache hit rate, misses and bytes
moved per token, prefetch precision/recall, and peak resident memory (VmHWM).
"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from moekit.cli.app import app
from moekit.cli._common import Threads, console, err_console, print_json, say, user_errors
from moekit.cli._streaming import ComputeDtype, Device, size_option

POLICY_HELP = "Cache policy: lru, lfu, or prior (pins the experts calibration selected most; needs --stats)."


def _memory_option(value: str | None) -> str | None:
    """A size, or a share of the routed experts (``25%``), checked when parsed (like every
    numeric flag: a bad one is refused before the model is read)."""
    if value is None or not value.strip().endswith("%"):
        return size_option(value)
    from moekit.errors import MoekitError
    from moekit.runtime.offload_budget import budget_bytes

    try:
        budget_bytes(value, 0)  # the one place a share is read
    except MoekitError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory (VmHWM from /proc/self/status; None where absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _streamer(tokenizer, show: bool):
    """A transformers streamer printing the new text as it comes (prompt left out)."""
    from transformers.generation.streamers import BaseStreamer

    class Printer(BaseStreamer):
        def __init__(self) -> None:
            self.ids: list[int] = []
            self.printed = 0
            self.prompt_seen = False
            self.first_token_at: float | None = None

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate hands the prompt first
                self.prompt_seen = True
                return
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.ids.extend(value.flatten().tolist())
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if show and not text.endswith("\ufffd"):  # wait for a whole character
                console.print(text[self.printed:], end="", markup=False, highlight=False, soft_wrap=True)
                self.printed = len(text)

        def end(self) -> None:
            if show:
                text = tokenizer.decode(self.ids, skip_special_tokens=True)
                console.print(text[self.printed:], markup=False, highlight=False, soft_wrap=True)

    return Printer()


@app.command("run")
def run_command(
    model: Annotated[Optional[str], typer.Argument(help="Checkpoint folder, hub id, or shipped reference.")] = None,
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "def fibonacci(n):",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 32,
    expert_memory: Annotated[str, typer.Option(
        parser=_memory_option, metavar="SIZE",
        help="Bytes of experts resident at once, over all layers (e.g. 4GB, 512MiB), or a share of the routed "
             "experts (25%).")] = "25%",
    policy: Annotated[str, typer.Option(help=POLICY_HELP)] = "lru",
    prefetch: Annotated[bool, typer.Option(help="Guess the next layer's experts with its router; load them early.")] = False,
    stats: Annotated[Optional[str], typer.Option(
        metavar="FOLDER", help="Statistics saved by `moekit calibrate -o FOLDER` (their frequency is the prior).")] = None,
    device: Device = "auto",
    compute_dtype: ComputeDtype = "auto",
    cache_dtype: Annotated[str, typer.Option(
        help="Dtype of the cached experts: auto (as the checkpoint stores them when the compute dtype holds that "
             "exactly, e.g. bfloat16 experts for float32 compute: half the memory, same outputs), float32, "
             "bfloat16 (from a float32 checkpoint: rounded, outputs change), float16.")] = "auto",
    slow_tier: Annotated[Optional[str], typer.Option(
        help="Where missed experts come from: disk (the checkpoint's files, per expert; default on a CPU) or memory "
             "(all routed experts read once into CPU RAM, pinned; default on a GPU).")] = None,
    compute_misses: Annotated[Optional[str], typer.Option(
        help="Compute a missed expert on the CPU from its slow-tier copy instead of loading it (Fiddler): never, "
             "always, or auto (a cost model measured at start; default on a GPU with the slow tier in memory).")] = None,
    json_out: Annotated[bool, typer.Option("--json", is_eager=True, help="Print JSON for scripts (no streamed text).")] = False,
    threads: Threads = None,
) -> None:
    """Generate text with the routed experts offloaded: only --expert-memory of them resident."""
    import torch

    from moekit.io.tokenizer import tokenizer_for
    from moekit.devices import resolve_compute_dtype, resolve_device
    from moekit.errors import MoekitError
    from moekit.io.load import check_model, default_model
    from moekit.runtime.offload import offload

    with user_errors():
        name = model or default_model()
        check_model(name)
        if policy not in ("lru", "lfu", "prior"):
            raise MoekitError(f"--policy {policy!r} is not one of lru, lfu, prior.")
        where = resolve_device(device)
        dtype = resolve_compute_dtype(compute_dtype, where)
        tokenizer = tokenizer_for(name)
        if policy == "prior" and stats is None:
            raise MoekitError("--policy prior pins the experts calibration selected most; pass --stats FOLDER "
                              "(written by `moekit calibrate MODEL -o FOLDER`).")
        if stats is not None and policy != "prior":
            raise MoekitError(f"--stats is read only by --policy prior (not {policy}); add --policy prior or drop "
                              "--stats.")
        prior = _statistics(stats) if stats else None
        started = time.perf_counter()
        offloaded = offload(name, expert_memory=expert_memory, device=where, policy=policy, prefetch=prefetch,
                            stats=prior, dtype=dtype, cache_dtype=cache_dtype, record_trace=False,
                            slow_tier=slow_tier, compute_misses=compute_misses)
        budget = offloaded.moekit_expert_memory
        load_s = time.perf_counter() - started
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(where)
        if ids.numel() == 0:
            raise MoekitError("--prompt is empty after tokenizing; give some text.")
        streamer = _streamer(tokenizer, show=not json_out)
        if not json_out:
            say(f"{name}: {budget:,} bytes of experts resident ({sum(offloaded.moekit_capacity.values())} slots of "
                f"{offloaded.moekit_cache_dtype} over {len(offloaded.moekit_capacity)} layers), policy {policy}"
                f"{', prefetch' if prefetch else ''}, on {where}", style="dim", to=err_console)
            console.print(prompt, end="", markup=False, highlight=False)
        started = time.perf_counter()
        with torch.no_grad():
            out = offloaded.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        ended = time.perf_counter()
    new = out.shape[1] - ids.shape[1]
    counters = offloaded.moekit_offload
    decode_s = ended - streamer.first_token_at if streamer.first_token_at else None
    report = {
        "model": name, "device": str(where), "policy": policy, "prefetch": prefetch, "expert_memory": budget,
        "cache_dtype": offloaded.moekit_cache_dtype, "slow_tier": offloaded.moekit_slow_tier,
        "miss_cost": offloaded.moekit_miss_cost.as_dict() if offloaded.moekit_miss_cost else None,
        "slots": offloaded.moekit_capacity, "prompt_tokens": ids.shape[1], "new_tokens": new,
        "load_s": round(load_s, 3), "generate_s": round(ended - started, 3),
        "tokens_per_s": new / (ended - started),
        "decode_tokens_per_s": (new - 1) / decode_s if decode_s and new > 1 else None,
        **counters.as_dict(), "peak_rss_bytes": peak_rss_bytes(),
        "text": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
    }
    if json_out:
        print_json(report)
        return
    precision, recall = report["prefetch_precision"], report["prefetch_recall"]
    peak = report["peak_rss_bytes"]
    console.print(
        f"[bold]{report['tokens_per_s']:.2f}[/] tokens/s ({new} tokens in {report['generate_s']:.2f} s"
        + (f"; decode {report['decode_tokens_per_s']:.2f} tokens/s" if report["decode_tokens_per_s"] else "") + "), "
        f"hit rate [bold]{report['hit_rate']:.1%}[/], {report['misses_per_token']:.2f} misses and "
        f"{report['bytes_moved_per_token'] / 2**20:.2f} MiB moved per token"
        + (f" ({report['computed_in_place']} misses computed in place)" if report["computed_in_place"] else "")
        + (f", prefetch precision {precision:.1%} recall {recall:.1%}" if precision is not None else "")
        + (f", peak memory {peak / 2**20:.0f} MiB" if peak else ""), highlight=False)


def _statistics(folder: str):
    from moekit.calib.stats import CalibrationStats

    return CalibrationStats.load(folder)
