"""Wall-clock generation speed of a model in memory: prefill, then decode with a KV cache.

`measure_speed(model)` feeds ``prefill`` tokens in one forward (the prompt: random ids, or
``prompt``), then
generates ``decode`` tokens one forward at a time, greedily, each step reusing the cache
the model's own forward returns (whatever the family keeps: attention keys and values,
linear-attention states). Each run is timed separately (device synchronised), after
``warmup`` untimed runs; the result holds every run's seconds and the median tokens/s of
each phase, with the thread count and the machine, so a number always says where it came
from. The model is only called, never changed: any routing policy or edit installed on it
is what gets timed, which makes it the one harness for static and dynamic methods alike.
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from moekit.errors import MoekitError


@dataclass
class SpeedResult:
    """Timings of `measure_speed`: tokens/s are batch × tokens / seconds, medians over runs."""

    prefill_tokens: int
    decode_tokens: int
    batch_size: int
    runs: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    threads: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    machine: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def machine_description(device: torch.device | None = None) -> dict:
    """Where a timing was taken: CPU model and cores, OS, torch, and the GPU if one ran it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cpu_count": os.cpu_count(), "machine": platform.machine(), "system": platform.system(),
           "python": platform.python_version(), "torch": torch.__version__}
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``cache`` in late transformers
    5.x, ``past_key_values`` before. Asked by the wrong name, a forward swallows it in
    ``**kwargs`` and decodes without the cache, silently."""
    parameters = inspect.signature(model.forward).parameters  # through decorators' __wrapped__
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise MoekitError(f"{type(model).__name__}.forward takes no KV cache (neither cache= nor past_key_values=); "
                      "this transformers version is not one moekit supports (see pyproject.toml).")


def returned_cache(out):
    """The cache a forward returned (``cache`` in late transformers 5.x, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


def decode_step(model: nn.Module, ids: torch.Tensor, cache):
    """One forward of ``ids`` [B, 1] after the tokens ``cache`` holds: (output, its cache)."""
    out = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    return out, returned_cache(out)


@torch.no_grad()
def _generate_once(model: nn.Module, ids: torch.Tensor, decode: int, device: torch.device) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation from ``ids``."""
    _synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    _synchronize(device)
    middle = time.perf_counter()
    cache = returned_cache(out)
    for _ in range(decode):
        out, cache = decode_step(model, next_ids, cache)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    _synchronize(device)
    return middle - start, time.perf_counter() - middle


def measure_speed(model: nn.Module, *, prefill: int = 512, decode: int = 128, runs: int = 5, warmup: int = 1,
                  batch_size: int = 1, seed: int = 0, prompt: torch.Tensor | None = None) -> SpeedResult:
    """Prefill and decode tokens/s of ``model`` (any causal LM in memory, on its device).

    Args:
        model: the model, as it is (policies or edits installed on it are timed with it).
        prefill: prompt tokens, fed in one forward.
        decode: tokens generated after the prompt, one forward each, with the KV cache.
        runs: timed generations; the result reports the median of each phase.
        warmup: untimed generations first (allocations, kernel choice).
        batch_size: prompts generated at once.
        seed: of the random prompt tokens.
        prompt: [B, S] token ids to use as the prompt instead of random ones (then
            ``prefill`` = S and ``batch_size`` = B): routing, and so the work of a dynamic
            routing policy, depends on the text, so time policies on real text.

    Raises:
        MoekitError: a prompt plus generation longer than the model's positions, or
            non-positive counts.
    """
    if prompt is not None:
        prompt = prompt.view(1, -1) if prompt.dim() == 1 else prompt
        batch_size, prefill = prompt.shape
    if prefill < 1 or decode < 1 or runs < 1 or warmup < 0 or batch_size < 1:
        raise MoekitError("measure_speed: prefill, decode, runs and batch_size must be at least 1 (warmup ≥ 0).")
    config = model.config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and prefill + decode > positions:
        raise MoekitError(f"measure_speed: {prefill} prompt + {decode} generated tokens exceed the model's "
                          f"{positions} positions; lower prefill or decode.")
    parameter = next(model.parameters())
    device = parameter.device
    vocab = int(getattr(config, "vocab_size"))
    ids = prompt if prompt is not None else torch.randint(min(3, vocab - 1), vocab, (batch_size, prefill),
                                                          generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            _generate_once(model, ids, decode, device)
        timings = [_generate_once(model, ids, decode, device) for _ in range(runs)]
    finally:
        model.train(was_training)
    prefill_s = [t[0] for t in timings]
    decode_s = [t[1] for t in timings]
    return SpeedResult(
        prefill_tokens=prefill, decode_tokens=decode, batch_size=batch_size, runs=runs,
        prefill_tokens_per_s=batch_size * prefill / statistics.median(prefill_s),
        decode_tokens_per_s=batch_size * decode / statistics.median(decode_s),
        prefill_seconds=[round(s, 6) for s in prefill_s], decode_seconds=[round(s, 6) for s in decode_s],
        threads=torch.get_num_threads(), device=str(device), dtype=str(parameter.dtype).removeprefix("torch."),
        machine=machine_description(device),
    )
