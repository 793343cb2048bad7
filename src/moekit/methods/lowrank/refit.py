"""Output compensation for factored experts: re-fit each expert's down output factor D_j
(down ≈ D_j C_j [+ V_b]) so the factored layer reproduces the original layer's routed
output on calibration inputs.

An expert's output is linear in D_j with features g_j(x)·C_j h_j(x) ∈ ℝ^s (s its down
rank), so this is the ridge least-squares problem `moekit.methods.refit.refit_down` solves
for pruned layers, with s×s systems instead of I×I: cheaper than refitting a full down
projection. Ranks differ between experts, so features and factors are zero-padded to the
largest rank (a padded column has no feature and a zero prior, so it stays zero).
"""

from __future__ import annotations

import torch

from moekit.arch.layer import MoELayer
from moekit.methods.lowrank.layer import LayerFactors
from moekit.methods.refit import ExpertFeatures, refit_down


@torch.no_grad()
def refit_factored_down(layer: MoELayer, factors: LayerFactors, inputs: torch.Tensor, target: torch.Tensor, *,
                        ridge: float, on_progress=None) -> dict:
    """Update ``factors.down``'s output factors in place towards ``target`` [n, H] (the
    original routed output on ``inputs`` [n, H]); returns the relative squared error
    before and after."""
    experts = layer.experts
    x = inputs.to(experts.gate_up.device, factors.gate_up[0][0].dtype)
    index, weights = layer.router.route(layer.router.logits(x))
    width = max(1, max(b.shape[1] for b, _ in factors.down))
    features, constant = [], torch.zeros(x.shape[0], experts.hidden_size, dtype=torch.float64)
    prior = torch.zeros(len(factors.down), experts.hidden_size, width, dtype=torch.float32)
    for j, (b, a) in enumerate(factors.down):
        token, slot = torch.where(index == j)
        gate_up = factors.gate_up[j][0] @ factors.gate_up[j][1]
        if factors.gate_up_base is not None:
            gate_up = gate_up + factors.gate_up_base
        z = experts.intermediate(j, x[token], gate_up) * weights[token, slot, None].to(x.dtype)
        if factors.down_base is not None and token.numel():
            constant.index_add_(0, token, (z @ factors.down_base.T).double())
        padded = torch.zeros(token.numel(), width, dtype=torch.float32)
        padded[:, : a.shape[0]] = (z @ a.T).float()
        features.append(ExpertFeatures(token, padded))
        prior[j, :, : b.shape[1]] = b.float()
    result = refit_down(features, target.double() - constant, prior, ridge=ridge, dtype=torch.float32,
                        on_progress=on_progress)
    for j, (b, a) in enumerate(factors.down):
        factors.down[j] = (result.down[j, :, : b.shape[1]].to(b.dtype).contiguous(), a)
    return {"error_before": round(result.error_before, 6), "error_after": round(result.error_after, 6),
            "sweeps": result.sweeps}
