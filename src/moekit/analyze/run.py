"""`moekit.analyze`: routing statistics of every MoE layer, in one layer-streamed pass.

The rows of every corpus go through the model one decoder layer at a time (the loop of
calibration, `moekit.calib.runner.LayerStreamer`); while a layer is lent, its MoE
block's inputs are routed by the canonical router and counted (`moekit.analyze.collect`).
With a focus corpus, a second streamed pass over that corpus's rows measures the loss
increase when each top candidate expert is masked (`moekit.analyze.attribution`).
Memory: one decoder layer, the hidden states of all rows, T·k selections of the previous
MoE layer and ``prefetch_tokens``·H of its block inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from statistics import fmean

import torch
from torch import nn

from moekit.errors import MoekitError

MIN_TOKENS = 512  # per corpus: below it every expert's share is a handful of selections
MIN_ROWS = 2  # the token lookup is fitted on even rows and tested on odd ones


@dataclass
class Analysis:
    """What `analyze` measured on one model. ``layers`` holds one dict per MoE layer (see
    `moekit.analyze.collect.LayerCounts.finish`), ``summary`` the layer means,
    ``attribution`` the masked-loss measurements (or None), ``meta`` provenance."""

    model: str
    corpora: list[dict]
    layers: list[dict]
    summary: dict
    attribution: dict | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain data (JSON-ready); shares the layer dicts rather than copying them (a copy of
        60 layers × 256² co-activation counts takes seconds)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_rows(name: str, input_ids: torch.Tensor) -> None:
    """A corpus must hold `MIN_ROWS` rows and `MIN_TOKENS` tokens for the statistics."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise MoekitError(f"corpus {name!r}: expected [rows, seq_len] token ids.")
    if input_ids.shape[0] < MIN_ROWS or input_ids.numel() < MIN_TOKENS:
        raise MoekitError(
            f"corpus {name!r} gives {input_ids.shape[0]} rows, {input_ids.numel()} tokens; routing analysis needs "
            f"at least {MIN_TOKENS} tokens in at least {MIN_ROWS} rows per corpus (add text, or raise --samples / "
            "lower --seq-len).")


def corpus_rows(source: str, tokenizer, *, samples: int, seq_len: int, seed: int = 0,
                text_field: str = "text") -> torch.Tensor:
    """Up to ``samples`` rows of ``seq_len`` tokens (a seeded choice, kept in corpus
    order) from the corpus ``source``; refused with the minimum when it is too small."""
    from moekit.data.packing import tokenize_corpus
    from moekit.data.sources import load_corpus

    stream = tokenize_corpus(load_corpus(source, text_field=text_field), tokenizer).long()
    n = stream.numel() // seq_len
    if n < MIN_ROWS or n * seq_len < MIN_TOKENS:
        raise MoekitError(
            f"{source} holds {stream.numel()} tokens ({n} rows of {seq_len}); routing analysis needs at least "
            f"{max(MIN_TOKENS, MIN_ROWS * seq_len)} tokens per corpus ({MIN_TOKENS} tokens in at least {MIN_ROWS} "
            "rows). Add text or lower --seq-len.")
    rows = stream[: n * seq_len].view(n, seq_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    return rows[order]


def _batches(data: dict[str, torch.Tensor], batch_size: int):
    from moekit.analyze.collect import Rows

    batches, corpus, fit = [], [], []
    for c, ids in enumerate(data.values()):
        parity = torch.arange(ids.shape[0]) % 2 == 0
        for start in range(0, ids.shape[0], batch_size):
            batches.append(ids[start:start + batch_size].long())
            corpus.append(c)
            fit.append(parity[start:start + batch_size])
    return batches, corpus, fit, Rows


def summarize(layers: list[dict], corpora: list[str]) -> dict:
    """Means over MoE layers of the headline numbers (None where nothing was measured)."""

    def mean(values):
        values = [v for v in values if v is not None]
        return fmean(values) if values else None

    nxt = [layer["from_previous"] for layer in layers if "from_previous" in layer]
    out = {
        "moe_layers": len(layers),
        "entropy_normalized": mean(layer["load"]["entropy_normalized"] for layer in layers),
        "imbalance": mean(layer["load"]["imbalance"] for layer in layers),
        "dead_experts": sum(len(layer["load"]["dead"]) for layer in layers),
        "near_dead_experts": sum(len(layer["load"]["near_dead"]) for layer in layers),
        "token_lookup_agreement": mean(layer["tokens"]["lookup_agreement"] for layer in layers),
        "token_static_agreement": mean(layer["tokens"]["static_agreement"] for layer in layers),
        "token_concentration": mean(layer["tokens"]["mean_concentration"] for layer in layers),
        "prefetch_recall": mean(n["prefetch_recall"] for n in nxt),
        "prefetch_static_recall": mean(n["static_recall"] for n in nxt),
        "mutual_information_normalized": mean(n["mutual_information_normalized"] for n in nxt),
        "mutual_information_top1_normalized": mean(n["mutual_information_top1_normalized"] for n in nxt),
        "position_max_divergence": max((layer["position"]["max_divergence"] for layer in layers), default=None),
    }
    if len(corpora) > 1:
        out["specific_experts"] = {name: sum(layer["domains"]["specific_count"][name] for layer in layers)
                                   for name in corpora}
    return out


@torch.no_grad()
def analyze(
    model: nn.Module,
    data: torch.Tensor | dict[str, torch.Tensor],
    *,
    focus: str | None = None,
    candidates: int = 8,
    batch_size: int = 8,
    position_buckets: int = 8,
    prefetch_tokens: int = 16384,
    decode=None,
    name: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    activations=None,
) -> Analysis:
    """Routing analysis of every MoE layer on the rows of one or several corpora.

    Args:
        model: a supported MoE model in memory (not modified), or a `LayeredModel`.
        data: [N, S] token ids, or {corpus name: [N_c, S]} (all rows of one width) for
            domain statistics; each corpus needs `MIN_TOKENS` tokens in `MIN_ROWS` rows.
        focus: a corpus name in ``data``: measure expert attribution on it (loss increase
            when an expert is masked) for the ``candidates`` experts with the largest
            gate share on it.
        position_buckets: the sequence positions are cut into this many equal buckets.
        prefetch_tokens: at most this many tokens, spread evenly over all rows, are those
            the one-step predictor is measured on.
        decode: token id -> text, for the token tables (e.g. a tokenizer's decode).
        device: where a model in memory computes (a `LayeredModel` has its own).
        activations: an `ActivationBudget` saying where the rows' hidden states live
            (default: in memory; the attribution pass keeps its copies in memory).

    Returns:
        `Analysis`; the report and figures are written by `moekit.analyze.report.write`.

    Raises:
        MoekitError: not an MoE model; a corpus too small; rows of different widths;
            token ids outside the vocabulary; a focus that is not one of the corpora.
    """
    from moekit.analyze.attribution import attribute
    from moekit.analyze.attribution import candidates as pick
    from moekit.analyze.collect import LayerCounts
    from moekit.calib.calibrate import check_input_ids
    from moekit.calib.runner import LayerStreamer
    from moekit.data.tokens import data_fingerprint
    from moekit.io.layered import LayeredModel
    from moekit.progress import progress_bar

    data = {"data": data} if isinstance(data, torch.Tensor) else dict(data)
    if not data:
        raise MoekitError("routing analysis needs at least one corpus.")
    for corpus, ids in data.items():
        check_rows(corpus, ids)
    widths = {ids.shape[1] for ids in data.values()}
    if len(widths) > 1:
        raise MoekitError(f"every corpus must have rows of one width (got {sorted(widths)}).")
    if focus is not None and focus not in data:
        raise MoekitError(f"--focus {focus!r} is not one of the corpora ({', '.join(data)}).")
    lent = model if isinstance(model, LayeredModel) else LayeredModel.in_memory(model, device=device)
    label = name or str(getattr(lent.model, "name_or_path", "") or type(lent.model).__name__)
    if lent.family is None:
        raise MoekitError(f"{label} is not a Mixture-of-Experts model of a supported family: it has no router "
                          "to analyze.")
    for ids in data.values():
        check_input_ids(lent.model.config, lent.model.get_input_embeddings().num_embeddings, ids)
    start = time.perf_counter()
    batches, corpus, fit, Rows = _batches(data, batch_size)
    rows = Rows(batches, corpus, list(data), fit, position_buckets=position_buckets,
                prefetch_tokens=prefetch_tokens)
    streamer = LayerStreamer(lent, batches, budget=activations)
    layers, previous = [], None
    n_layers = len(lent)
    with progress_bar("analyzing", total=n_layers * len(batches), unit="batch", enabled=progress) as advance:
        hidden = streamer.capture()
        for index, layer, view, on_batch in streamer.routed_layers(hidden, advance):
            counts = LayerCounts(view, rows, previous)
            streamer.forward(index, layer, hidden, observe=counts.watching(), on_batch=on_batch)
            layers.append(counts.finish(decode))
            previous = counts.carry()
            del counts
    del hidden, streamer, previous
    if not layers:
        raise MoekitError(f"{label} has no MoE layer to analyze.")
    attribution = None
    if focus is not None:
        chosen = pick(layers, list(data).index(focus), candidates)
        with progress_bar("attribution", total=n_layers + 1 + len(chosen), unit="step", enabled=progress) as advance:
            attribution = attribute(lent, data[focus], chosen, batch_size=batch_size,
                                    progress=lambda status: advance(1, status))
        attribution = {"corpus": focus, **attribution}
    all_ids = torch.cat([ids.reshape(-1) for ids in data.values()])
    return Analysis(
        model=label,
        corpora=[{"name": c, "rows": int(ids.shape[0]), "tokens": int(ids.numel()),
                  "data_fingerprint": data_fingerprint(ids)} for c, ids in data.items()],
        layers=layers,
        summary=summarize(layers, list(data)),
        attribution=attribution,
        meta={"seq_len": int(next(iter(widths))), "tokens": int(all_ids.numel()),
              "data_fingerprint": data_fingerprint(torch.cat(list(data.values()))),
              "position_buckets": position_buckets, "prefetch_tokens": prefetch_tokens,
              "batch_size": batch_size, "seconds": round(time.perf_counter() - start, 3)},
    )
