"""Held-out loss and expert load of a causal LM on packed sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moekit.train.capture import RouterCapture


@dataclass
class EvalResult:
    """``loss``: mean next-token cross-entropy (nats); ``load``: {layer: [E] fraction of
    routed slots}; ``tokens``: predicted tokens counted."""

    loss: float
    tokens: int
    load: dict[int, list[float]]

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def min_load_ratio(self) -> float:
        """min over layers and experts of load_j · E: 1 if balanced, 0 if an expert is dead."""
        return min(min(v) * len(v) for v in self.load.values())

    def max_load_ratio(self) -> float:
        return max(max(v) * len(v) for v in self.load.values())


@torch.no_grad()
def evaluate(model: nn.Module, rows: torch.Tensor, *, batch_size: int = 8) -> EvalResult:
    """Cross-entropy of ``model`` on ``rows`` [N, L] and the load of every expert.

    Every row contributes L − 1 predictions; the mean is over all of them, so the
    result does not depend on ``batch_size``.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    counts: dict[int, torch.Tensor] = {}
    try:
        with RouterCapture(model) as cap:
            for start in range(0, rows.shape[0], batch_size):
                batch = rows[start : start + batch_size]
                cap.clear()
                logits = model(input_ids=batch).logits.float()
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(nll)
                count += batch[:, 1:].numel()
                for rec in cap.records:
                    num_experts = rec.logits.shape[-1]
                    c = torch.bincount(rec.top_k_index.reshape(-1), minlength=num_experts).double()
                    counts[rec.layer] = counts.get(rec.layer, 0) + c
    finally:
        model.train(was_training)
    load = {layer: (c / c.sum()).tolist() for layer, c in sorted(counts.items())}
    return EvalResult(loss=total / max(count, 1), tokens=count, load=load)
