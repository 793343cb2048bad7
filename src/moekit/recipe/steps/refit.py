"""Output compensation for the steps that remove experts (``refit: true`` on ``prune``
and ``merge``): take a layer's routed output on calibration inputs before the edit, then
re-fit the surviving experts' down projections to reproduce it (`moekit.methods.refit`).
Steps edit and refit one layer at a time, so only one layer's target is held."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.arch.edit import set_expert_weights
from moekit.arch.layer import MoELayer
from moekit.methods.refit import layer_features, refit_down, routed_output

NEEDS = {"hidden_sample"}


@dataclass(frozen=True)
class Target:
    """A layer's calibration inputs [n, H] and its routed output on them [n, H] (float64),
    taken before the edit."""

    inputs: torch.Tensor
    output: torch.Tensor


@torch.no_grad()
def target(layer: MoELayer, stats, samples: int) -> Target:
    """What ``layer`` computes now on the first ``samples`` rows of its hidden sample."""
    inputs = stats.hidden_inputs(layer.index, samples)
    return Target(inputs, routed_output(layer, inputs).double())


@torch.no_grad()
def refit_layer(model: nn.Module, layer: MoELayer, goal: Target, *, ridge: float, on_progress=None) -> dict:
    """Re-fit ``layer``'s down projections towards ``goal`` (from `target`, taken before the
    edit); returns the relative squared error on the calibration inputs before and after.
    ``on_progress(status)`` hears the experts refitted so far (a status line)."""
    from moekit.methods.refit import MAX_SWEEPS
    from moekit.progress import counting_status

    features, constant = layer_features(layer, goal.inputs)
    counter = counting_status(on_progress, f"layer {layer.index}: refit", "expert",
                              bound=layer.num_experts * MAX_SWEEPS)
    result = refit_down(features, goal.output - constant, layer.experts.down.detach(), ridge=ridge,
                        on_progress=counter, dtype=torch.float32)
    for j in range(layer.num_experts):
        set_expert_weights(model, layer.index, j, down=result.down[j])
    return {"error_before": round(result.error_before, 6), "error_after": round(result.error_after, 6),
            "sweeps": result.sweeps}
