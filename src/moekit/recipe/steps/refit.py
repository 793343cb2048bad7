"""Output compensation for the steps that remove experts (``refit: true`` on ``prune``
and ``merge``): capture each MoE layer's routed output on calibration inputs before the
edit, then re-fit the surviving experts' down projections to reproduce it
(`moekit.methods.refit`)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.arch.discover import moe_layers
from moekit.arch.edit import set_expert_weights
from moekit.methods.refit import layer_features, refit_down, routed_output

NEEDS = {"hidden_sample"}


def hidden_inputs(layer_stats: dict[str, torch.Tensor], samples: int) -> torch.Tensor:
    """The first ``samples`` rows of one layer's hidden sample. The sample is ordered by
    a hash key, so its first m rows are exactly the sample a calibration with m would keep."""
    return layer_stats["hidden_sample"][:samples]


@torch.no_grad()
def capture_targets(model: nn.Module, stats, samples: int) -> dict[int, torch.Tensor]:
    """``{layer index: routed output [n, H]}`` of every MoE layer as it is now."""
    return {layer.index: routed_output(layer, hidden_inputs(stats[layer.index], samples)).double()
            for layer in moe_layers(model)}


@torch.no_grad()
def refit_experts(model: nn.Module, stats, targets: dict[int, torch.Tensor], *, samples: int, ridge: float) -> dict:
    """Re-fit every MoE layer's down projections towards ``targets``; returns per layer
    the relative squared error on the calibration inputs before and after."""
    report = {}
    for layer in moe_layers(model):
        features, constant = layer_features(layer, hidden_inputs(stats[layer.index], samples))
        result = refit_down(features, targets[layer.index] - constant, layer.experts.down.detach(), ridge=ridge)
        for j in range(layer.num_experts):
            set_expert_weights(model, layer.index, j, down=result.down[j])
        report[str(layer.index)] = {"error_before": round(result.error_before, 6),
                                    "error_after": round(result.error_after, 6), "sweeps": result.sweeps}
    return report
