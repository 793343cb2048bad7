"""Held-out loss and expert load of a model being trained, on packed sequences.

Each row [L] is its own window, so every row contributes L − 1 predictions; this is
`moekit.evaluate` with one window per row, shared with every other evaluation in moekit.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.eval.perplexity import EvalResult
from moekit.eval.perplexity import evaluate as _evaluate


@torch.no_grad()
def evaluate(model: nn.Module, rows: torch.Tensor, *, batch_size: int = 8) -> EvalResult:
    """Cross-entropy of ``model`` on ``rows`` [N, L] and the load of every expert."""
    was_training = model.training
    model.eval()
    try:
        length = rows.shape[1]
        return _evaluate(model, rows, context_length=length, stride=length - 1, batch_size=batch_size, progress=False)
    finally:
        model.train(was_training)


__all__ = ["EvalResult", "evaluate"]
