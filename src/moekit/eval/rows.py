"""Bounded evaluations: rows spread evenly over a whole corpus, each its own window (what
``moekit compress --eval`` scores before and after, and the benchmarks reuse)."""

from __future__ import annotations

import torch

from moekit.data.packing import pack
from moekit.eval.perplexity import evaluate


def spread_rows(stream: torch.Tensor, max_tokens: int | None, length: int) -> torch.Tensor:
    """Rows [N, length] of ``stream`` [L], at most ``max_tokens`` tokens in all, spread evenly
    over the whole stream: a bounded evaluation that still sees every part of the corpus
    (the first tokens of a corpus are often one unrepresentative file)."""
    if stream.numel() < length:
        return stream.view(1, -1)
    rows = pack(stream, length)
    if max_tokens:
        count = max(1, min(rows.shape[0], max_tokens // length))
        rows = rows[torch.linspace(0, rows.shape[0] - 1, count).round().long()]
    return rows


def evaluate_rows(model, rows: torch.Tensor, batch_size: int, progress: bool, shard: bool = True) -> dict:
    """Perplexity and accuracy of ``model`` on ``rows`` [N, length] (`spread_rows`), as
    compress's ``--eval`` reports them. Each row is its own window, so every row contributes
    length − 1 predictions
    (``shard``: shared out among torch.distributed ranks, when there are several)."""
    length = rows.shape[1]
    result = evaluate(model, rows, batch_size=batch_size, progress=progress, routing=False,
                      context_length=length, stride=max(length - 1, 1), shard=shard)
    return {"perplexity": result.perplexity, "accuracy": result.accuracy, "tokens": result.tokens,
            "rows": rows.shape[0], "row_length": length}
