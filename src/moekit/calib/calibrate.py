"""`moekit.calibrate`: the statistics every compression method reads, layer by layer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from moekit.arch.discover import moe_layers
from moekit.calib.observers import STATISTICS, BatchContext, LayerAccumulator
from moekit.calib.runner import LayerStreamer
from moekit.calib.stats import CalibrationStats, data_fingerprint, model_fingerprint
from moekit.errors import MoekitError
from moekit.progress import progress_bar


def check_input_ids(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Calibration and evaluation data must be [N, S] token ids the model can position."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.numel() == 0:
        raise MoekitError("calibration data must be a non-empty [samples, seq_len] tensor of token ids.")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise MoekitError(
            f"seq_len {input_ids.shape[1]} is beyond the model's {max_positions} positions; use a shorter seq_len."
        )
    vocab = model.get_input_embeddings().num_embeddings
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        raise MoekitError(
            f"token ids range {int(input_ids.min())}..{int(input_ids.max())} but the model's vocabulary has "
            f"{vocab} entries; tokenize with the model's own tokenizer."
        )


def calibrate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    statistics: Iterable[str] = ("frequency",),
    batch_size: int = 8,
    hidden_sample: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    meta: dict | None = None,
) -> CalibrationStats:
    """Compute per-expert statistics of every MoE layer, one decoder layer at a time.

    Args:
        model: a model of a supported family (not modified).
        input_ids: [N, S] calibration token ids.
        statistics: names from `moekit.calib.observers.STATISTICS`; ``frequency`` (and
            the token count) is always included. ``mean_output`` runs every expert on
            every token — ask for it only when a method needs it.
        hidden_sample: with ``hidden_sample`` in ``statistics``, how many input hidden
            states to keep per layer (a seeded uniform sample).
        device: where each layer computes; idle layers and hidden states stay on CPU.
        meta: extra provenance recorded with the statistics (e.g. the data source).

    Returns:
        `CalibrationStats` whose ``meta`` records model and data fingerprints.
    """
    wanted = frozenset({"frequency", *statistics})
    unknown = sorted(wanted - set(STATISTICS))
    if unknown:
        raise MoekitError(f"unknown statistics {unknown}; choose from {sorted(STATISTICS)}.")
    if "hidden_sample" in wanted and hidden_sample <= 0:
        raise MoekitError("the hidden_sample statistic needs hidden_sample=<number of states to keep> > 0.")
    check_input_ids(model, input_ids)
    views = {layer.index: layer for layer in moe_layers(model)}
    start = time.perf_counter()
    streamer = LayerStreamer(model, input_ids, batch_size=batch_size, device=device)
    accumulators = {
        i: LayerAccumulator(v.num_experts, v.experts.hidden_size, wanted, hidden_sample, seed + i)
        for i, v in views.items()
    }

    @contextlib.contextmanager
    def observe(index: int, layer: nn.Module) -> Iterator[None]:
        if index not in views:
            yield
            return
        view = views[index]

        def hook(_module, args):
            hidden = args[0]
            accumulators[index].update(BatchContext(view, hidden.reshape(-1, hidden.shape[-1])))

        handle = view.block.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    n_layers, n_batches = len(streamer.decoder), len(streamer.batches)
    with progress_bar("calibrating", total=n_layers * n_batches, unit="batch", enabled=progress) as advance:
        streamer.run(observe=observe, on_batch=lambda layer, batch: advance(1, f"layer {layer + 1}/{n_layers}"))

    return CalibrationStats(
        layers={i: acc.finish() for i, acc in accumulators.items()},
        tokens={i: acc.tokens for i, acc in accumulators.items()},
        meta={
            **(meta or {}),
            "model_name": str(getattr(model, "name_or_path", "") or type(model).__name__),
            "model_fingerprint": model_fingerprint(model),
            "data_fingerprint": data_fingerprint(input_ids),
            "statistics": sorted(wanted),
            "n_samples": int(input_ids.shape[0]),
            "seq_len": int(input_ids.shape[1]),
            "seed": seed,
            "hidden_sample": hidden_sample,
            "seconds": round(time.perf_counter() - start, 3),
        },
    )
