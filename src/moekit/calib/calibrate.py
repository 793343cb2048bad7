"""`moekit.calibrate`: the statistics every compression method reads, layer by layer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from moekit.arch.layer import MoELayer
from moekit.calib.observers import STATISTICS, BatchContext, LayerAccumulator, known_statistic
from moekit.calib.stats import CalibrationStats, ModelDigest, agree_streamed
from moekit.data.tokens import data_fingerprint
from moekit.errors import MoekitError, setting
from moekit.io.layered import LayeredModel
from moekit.progress import progress_bar


def check_input_ids(config, vocab_size: int, input_ids: torch.Tensor) -> None:
    """Calibration and evaluation data must be [N, S] token ids the model can position."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.numel() == 0:
        raise MoekitError("calibration data must be a non-empty [samples, seq_len] tensor of token ids.")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise MoekitError(
            f"seq_len {input_ids.shape[1]} is beyond the model's {max_positions} positions; use a shorter seq_len."
        )
    if int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0:
        raise MoekitError(
            f"token ids range {int(input_ids.min())}..{int(input_ids.max())} but the model's vocabulary has "
            f"{vocab_size} entries; tokenize with the model's own tokenizer."
        )


def check_statistics(statistics: Iterable[str], hidden_sample: int) -> frozenset[str]:
    """The statistics to collect (``frequency`` always), checked by name."""
    wanted = frozenset({"frequency", *statistics})
    unknown = sorted(name for name in wanted if not known_statistic(name))
    if unknown:
        raise MoekitError(f"unknown statistics {unknown}; choose from {sorted(STATISTICS)}.")
    if "hidden_sample" in wanted and hidden_sample <= 0:
        raise MoekitError(f"the hidden_sample statistic needs {setting('hidden_sample')} set to the number of states "
                          "to keep (above 0).")
    return wanted


@contextlib.contextmanager
def observing(view: MoELayer, accumulator: LayerAccumulator) -> Iterator[None]:
    """While open, every input of ``view``'s MoE block updates ``accumulator``."""
    from moekit.arch.layer import watching

    with watching(view.block, lambda x: accumulator.update(BatchContext(view, x.reshape(-1, x.shape[-1])))):
        yield


def new_accumulator(view: MoELayer, wanted: frozenset[str], hidden_sample: int, seed: int,
                    streamer=None) -> LayerAccumulator:
    """The accumulator of layer ``view.index`` (its hidden sample seeded by seed + index),
    for the rows ``streamer`` (a `LayerStreamer`) pushes: its rank's share, combined with
    the other ranks' when finished."""
    return LayerAccumulator(view.num_experts, view.experts.hidden_size, wanted, hidden_sample, seed + view.index,
                            first_position=streamer.first_token if streamer is not None else 0,
                            world=streamer.world if streamer is not None else None)


def calibrate(
    model: nn.Module | LayeredModel,
    input_ids: torch.Tensor,
    *,
    statistics: Iterable[str] = ("frequency",),
    batch_size: int = 8,
    hidden_sample: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    meta: dict | None = None,
    activations=None,
) -> CalibrationStats:
    """Compute per-expert statistics of every MoE layer, one decoder layer at a time.

    Args:
        model: a model of a supported family in memory (not modified), or a
            `LayeredModel` that reads each layer from its checkpoint when its turn comes.
        input_ids: [N, S] calibration token ids.
        statistics: names from `moekit.calib.observers.STATISTICS`; ``frequency`` (and
            the token count) is always included. ``mean_output`` runs every expert on
            every token — ask for it only when a method needs it.
        hidden_sample: with ``hidden_sample`` in ``statistics``, how many input hidden
            states to keep per layer (a seeded uniform sample).
        device: where each layer computes (a model in memory only; a `LayeredModel`
            has its own); idle layers and hidden states stay on CPU.
        meta: extra provenance recorded with the statistics (e.g. the data source).
        activations: an `ActivationBudget` saying where hidden states live (default:
            in memory).

    Returns:
        `CalibrationStats` whose ``meta`` records model and data fingerprints.

    Memory: one decoder layer's weights, the hidden states of all rows (N·S·H·4 bytes,
    or one batch of them when spilled to disk), and the statistics (the hidden sample
    is n·H·4 bytes per MoE layer).
    """
    from moekit.calib.runner import LayerStreamer

    wanted = check_statistics(statistics, hidden_sample)
    lent = model if isinstance(model, LayeredModel) else LayeredModel.in_memory(model, device=device)
    check_input_ids(lent.model.config, lent.model.get_input_embeddings().num_embeddings, input_ids)
    start = time.perf_counter()
    streamer = LayerStreamer(lent, input_ids, batch_size=batch_size, budget=activations, shard=True)
    agree_streamed(lent, input_ids, {"statistics": sorted(wanted), "settings": [hidden_sample, seed, batch_size]},
                   streamer.world, "calibration")  # ranks given other inputs would mix unrelated sums
    digest = ModelDigest(lent.model.config)
    layers, tokens, routers = {}, {}, {}
    n_layers, n_batches = len(lent), len(streamer.batches)
    with progress_bar("calibrating", total=n_layers * n_batches, unit="batch", enabled=progress) as advance:
        hidden = streamer.capture()
        for index, layer, view, on_batch in streamer.routed_layers(hidden, advance):
            digest.add_router(view.router.weight)
            routers[str(index)] = digest.routers[-1]
            accumulator = new_accumulator(view, wanted, hidden_sample, seed, streamer)
            streamer.forward(index, layer, hidden, observe=observing(view, accumulator), on_batch=on_batch)
            layers[index], tokens[index] = accumulator.finish(), accumulator.tokens
    return CalibrationStats(
        layers=layers,
        tokens=tokens,
        meta={
            **(meta or {}),
            "model_name": str(getattr(lent.model, "name_or_path", "") or type(lent.model).__name__),
            "model_fingerprint": digest.hexdigest(),
            "config_fingerprint": digest.config_fingerprint(),
            "routers": routers,  # per MoE layer: a compress reusing these statistics checks each layer's router
            "data_fingerprint": data_fingerprint(input_ids),
            "statistics": sorted(wanted),
            "n_samples": int(input_ids.shape[0]),
            "seq_len": int(input_ids.shape[1]),
            "seed": seed,
            "hidden_sample": hidden_sample,
            "seconds": round(time.perf_counter() - start, 3),
        },
    )
