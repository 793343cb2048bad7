"""Output compensation: re-fit the surviving experts' down projections so that the
reduced layer reproduces the original layer's output.

After pruning or merging, tokens that went to a removed expert are routed to the
remaining ones, whose outputs no longer sum to what the layer used to produce. Each
kept expert's output is linear in its down projection, so the best down projections
for a set of calibration inputs are a (ridge) least-squares problem:

    min_D  Σ_x ‖Y(x) − Σ_{j∈S} z_j(x) D_jᵀ‖²  +  Σ_j λ_j ‖D_j − D_j⁰‖²

with Y(x) the original layer's routed output (minus the kept experts' down biases),
z_j(x) = g_j(x)·σ(gate_j x) ⊙ (up_j x) ∈ ℝ^I the weighted intermediate activation of
kept expert j (zero unless the reduced router picks j for x), D_j [H, I] its down
projection and D_j⁰ its value before the fit. The ridge term λ_j = ridge · mean
diag(Z_jᵀZ_j) keeps the fit from chasing noise in the calibration sample.

This is the layer-wise reconstruction that post-training pruning of dense models
(OBS / SparseGPT-style weight updates) applies to pruned weights, applied here to the
experts that survive an expert-level reduction. The joint system has S·I unknowns per
output coordinate, too many to factor for large MoEs (64 experts × 768 = 49k), so it is
solved by block coordinate descent: each sweep solves every expert's I×I system with the
others fixed. The objective never increases and converges to the joint optimum (the
system is positive definite); `tests/methods/test_refit.py` checks both against a
direct solve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moekit.arch.layer import MoELayer

MAX_SWEEPS = 20  # `refit_down` updates each expert at most this many times: len(features) × MAX_SWEEPS in all


@dataclass
class ExpertFeatures:
    """Expert j's share of the reduced layer on the calibration inputs.

    Attributes:
        tokens: [n_j] int64, the inputs the reduced router sends to expert j.
        z: [n_j, I], the weighted intermediate activations g_j(x)·h_j(x) of those inputs.
    """

    tokens: torch.Tensor
    z: torch.Tensor


@dataclass
class RefitResult:
    """New down projections [S, H, I] and the fit's relative squared error
    Σ‖Y − Ŷ‖² / Σ‖Y‖² before (current weights) and after."""

    down: torch.Tensor
    error_before: float
    error_after: float
    sweeps: int


def _predict(features: list[ExpertFeatures], down: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, down.shape[1], dtype=down.dtype)
    for j, f in enumerate(features):
        if f.tokens.numel():
            out.index_add_(0, f.tokens, f.z @ down[j].T)
    return out


@torch.no_grad()
def refit_down(
    features: list[ExpertFeatures],
    target: torch.Tensor,
    down: torch.Tensor,
    *,
    ridge: float = 0.1,
    max_sweeps: int = MAX_SWEEPS,
    tol: float = 1e-6,
    on_progress: Callable[[int], None] | None = None,
    dtype: torch.dtype = torch.float64,
) -> RefitResult:
    """Solve the ridge least-squares fit of the down projections (see module docstring).

    Args:
        features: one `ExpertFeatures` per kept expert, in expert order.
        target: [n, H] what the layer's routed experts should output on the n inputs.
        down: [S, H, I] current down projections (the ridge prior D⁰).
        ridge: relative ridge strength (≥ 0); 0 is plain least squares.
        max_sweeps, tol: block coordinate descent stops after ``max_sweeps`` sweeps or
            when a sweep lowers the objective by less than ``tol`` of its value.
        on_progress: called with 1 after each expert's update in a sweep (experts that
            receive no input included); the calls add up to ``len(features)`` × the sweeps
            run, at most ``len(features) * max_sweeps``.
        dtype: what the sweeps compute in (sums of squares are taken in float64). The
            [n_j, I]·[I, H] products dominate at real sizes, and on CPUs float32 runs them
            about twice as fast; the ridge keeps every system well conditioned, so
            compression uses float32, and the tests use float64 to check the method
            against a direct solve.

    Returns:
        `RefitResult` with the new down projections in ``down``'s dtype. Experts that
        receive no input keep their weights.
    """
    n = target.shape[0]
    y = target.to(dtype)
    prior = down.to(dtype)
    new = prior.clone()
    features = [ExpertFeatures(f.tokens, f.z.to(dtype)) for f in features]
    norm = max(float((y**2).sum(dtype=torch.float64)), 1e-300)

    factors, lambdas = [], []
    for f in features:
        if not f.tokens.numel():  # never chosen: nothing to fit, the weights stay
            factors.append(None)
            lambdas.append(0.0)
            continue
        gram = f.z.T @ f.z
        scale = float(gram.diagonal().mean())
        lam = ridge * scale
        # A tiny floor keeps the factorisation defined when ridge is 0 and an expert saw
        # fewer tokens than it has neurons (the system is then under-determined).
        jitter = 1e-10 * max(scale, 1e-30)
        factors.append(torch.linalg.cholesky(gram + (lam + jitter) * torch.eye(gram.shape[0], dtype=gram.dtype)))
        lambdas.append(lam)

    def objective(prediction: torch.Tensor, weights: torch.Tensor) -> float:
        penalty = sum(lam * float(((weights[j] - prior[j]) ** 2).sum(dtype=torch.float64))
                      for j, lam in enumerate(lambdas))
        return float(((y - prediction) ** 2).sum(dtype=torch.float64)) + penalty

    prediction = _predict(features, new, n)
    error_before = float(((y - prediction) ** 2).sum(dtype=torch.float64)) / norm
    previous = objective(prediction, new)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        for j, f in enumerate(features):
            if factors[j] is not None:
                own = f.z @ new[j].T
                residual = y[f.tokens] - prediction[f.tokens] + own  # [n_j, H]: what j alone should produce
                rhs = f.z.T @ residual + lambdas[j] * prior[j].T  # [I, H]
                updated = torch.cholesky_solve(rhs, factors[j]).T  # [H, I]
                prediction.index_add_(0, f.tokens, f.z @ (updated - new[j]).T)
                new[j] = updated
            if on_progress is not None:
                on_progress(1)
        current = objective(prediction, new)
        converged = previous - current <= tol * max(previous, 1e-300)
        previous = current
        if converged:
            break
    error_after = float(((y - prediction) ** 2).sum(dtype=torch.float64)) / norm
    return RefitResult(new.to(down.dtype), error_before, error_after, sweeps)


@torch.no_grad()
def routed_output(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """Σ_j g_j(x) f_j(x) of ``layer`` as it is now (shared experts excluded). [n, H] -> [n, H]."""
    hidden = hidden.to(layer.router.weight.dtype)
    index, weights = layer.router.route(layer.router.logits(hidden))
    return layer.routed_forward(hidden, index, weights)


@torch.no_grad()
def layer_features(layer: MoELayer, hidden: torch.Tensor) -> tuple[list[ExpertFeatures], torch.Tensor]:
    """Each expert's `ExpertFeatures` under the layer's current routing, and the part of
    the routed output that does not depend on the down projections (the down biases,
    weighted) [n, H]. With these, routed output = Σ_j scatter(z_j D_jᵀ) + that part."""
    experts = layer.experts
    hidden = hidden.to(layer.router.weight.dtype)
    index, weights = layer.router.route(layer.router.logits(hidden))
    weight_on_input = layer.router.spec.weight_on_input
    constant = torch.zeros(hidden.shape[0], experts.hidden_size, dtype=torch.float64)
    features = []
    for j in range(layer.num_experts):
        tokens, slot = torch.where(index == j)
        g = weights[tokens, slot, None].to(hidden.dtype)
        h = experts.intermediate(j, hidden[tokens] * g if weight_on_input else hidden[tokens])
        features.append(ExpertFeatures(tokens, h if weight_on_input else h * g))
        if experts.down_bias is not None and tokens.numel():
            scale = torch.ones_like(g) if weight_on_input else g
            constant.index_add_(0, tokens, (scale * experts.down_bias[j]).double())
    return features, constant
