"""One MoE layer's experts decomposed: per-expert truncated SVD, or a shared base per
projection plus each expert's low-rank delta (D²-MoE, arXiv 2502.17298), activation-aware.

Each expert's projections are whitened by the inputs they see on the calibration sample:
gate/up by the second moment Σ_{x∈X_j} w(x)² x xᵀ of the tokens routed to expert j, down
by the same moment of its intermediate activations h_j(x), computed with the already
factored gate/up (sequentially, as GPTQ quantizes). With ``weighting: tokens`` w = 1 (the
expert's input second moment, as SVD-LLM whitens a dense Linear); with ``gate`` w = g_j(x),
its routing weight, which makes the squared singular values exactly the routed-output error
each rank removes. Measured on both reference models, ``tokens`` with strong damping
(λ = mean diag C) generalises better (BENCHMARKS.md), so it is the default. Either way
the squared singular values carry the expert's importance — tokens routed to it (or gate
mass) × activation energy — and `moekit.methods.lowrank.allocate` spends the budget where
it removes most error. Experts never routed on the sample are factored by plain SVD, and
rank allocation treats their error as costing nothing.

With ``shared_basis`` the base of each projection is the mean of the experts' weights,
weighted by importance Σ_{x∈X_j} w(x)²‖x‖² (for down: of h_j), and only the deltas
W_j − W_b are factored; the base costs one expert's parameters per projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit.arch.layer import MoELayer
from moekit.methods.lowrank import allocate
from moekit.methods.lowrank.svd import Factors, factorize


@dataclass
class LayerFactors:
    """The factored layer: per expert (B, A) of gate/up [2I, r]·[r, H] and of down
    [H, s]·[s, I], optional bases [2I, H] and [H, I], and the relative weighted error of each
    projection type on the calibration sample (dropped σ² / all σ²); ``energies`` per projection
    type, [E, m] σ² of every expert (zero for an expert the sample never routes to): what
    ``budget: global`` plans from."""

    gate_up: list[tuple[torch.Tensor, torch.Tensor]]
    down: list[tuple[torch.Tensor, torch.Tensor]]
    gate_up_base: torch.Tensor | None = None
    down_base: torch.Tensor | None = None
    errors: dict[str, float] = field(default_factory=dict)
    energies: dict[str, torch.Tensor] = field(default_factory=dict)

    def params(self) -> int:
        parts = [t for pair in (*self.gate_up, *self.down) for t in pair]
        parts += [t for t in (self.gate_up_base, self.down_base) if t is not None]
        return sum(t.numel() for t in parts)


@dataclass(frozen=True)
class Settings:
    """``keep``: share of the layer's routed-expert parameters kept (or ``rank``: one rank
    for every expert and projection); ``allocation``: ``error`` or ``uniform`` ranks;
    ``whiten``: activation-aware (False: plain SVD); ``weighting``: ``tokens`` or ``gate``
    (see the module docstring); ``damp``: see `moekit.methods.lowrank.svd`; ``units``: the
    rank units of (gate/up, down) a cross-layer plan gave this layer, instead of ``keep``'s."""

    shared_basis: bool = False
    keep: float | None = 0.5
    rank: int | None = None
    allocation: str = "error"
    whiten: bool = True
    weighting: str = "tokens"
    damp: float = 1.0
    units: tuple[int, int] | None = None


def projection_budget(keep: float, num_experts: int, out_features: int, in_features: int, base: bool) -> int:
    """Parameters one projection type of a layer may keep: ``keep`` of its E·out·in, minus
    the base's out·in when there is one."""
    return int(keep * num_experts * out_features * in_features) - (out_features * in_features if base else 0)


@torch.no_grad()
def decompose_layer(layer: MoELayer, hidden: torch.Tensor, settings: Settings) -> LayerFactors:
    """Factors of ``layer``'s experts from calibration inputs ``hidden`` [n, H] (see the module
    docstring). Computed in float64; factors are returned in the experts' dtype."""
    experts = layer.experts
    dtype = experts.gate_up.dtype
    x = hidden.to(experts.gate_up.device, dtype)
    index, weights = layer.router.route(layer.router.logits(x))
    routes = []
    for j in range(layer.num_experts):
        token, slot = torch.where(index == j)
        gate = weights[token, slot].double()
        routes.append((token, gate if settings.weighting == "gate" else torch.ones_like(gate)))

    def moment(inputs: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
        if not settings.whiten or not inputs.shape[0]:
            return None
        weighted = inputs.double() * g[:, None]
        return weighted.T @ weighted  # Σ w² x xᵀ

    # gate/up
    ins = [x[token] for token, _ in routes]
    gate_up, base_gu, err_gu, energy_gu = _factor_projection(
        [experts.gate_up[j] for j in range(layer.num_experts)], [moment(i, g) for i, (_, g) in zip(ins, routes)],
        [(i.double() * g[:, None]).pow(2).sum() for i, (_, g) in zip(ins, routes)], settings,
        settings.units[0] if settings.units else None)
    gate_up = [(b.to(dtype), a.to(dtype)) for b, a in gate_up]
    base_gu = base_gu.to(dtype) if base_gu is not None else None

    # down, on the intermediate activations of the factored gate/up
    mids = []
    for j, (token, _) in enumerate(routes):
        product = gate_up[j][0] @ gate_up[j][1]
        mids.append(experts.intermediate(j, ins[j], product + base_gu if base_gu is not None else product))
    down, base_d, err_d, energy_d = _factor_projection(
        [experts.down[j] for j in range(layer.num_experts)], [moment(h, g) for h, (_, g) in zip(mids, routes)],
        [(h.double() * g[:, None]).pow(2).sum() for h, (_, g) in zip(mids, routes)], settings,
        settings.units[1] if settings.units else None)
    return LayerFactors(gate_up, [(b.to(dtype), a.to(dtype)) for b, a in down], base_gu,
                        base_d.to(dtype) if base_d is not None else None, {"gate_up": err_gu, "down": err_d},
                        {"gate_up": energy_gu, "down": energy_d})


def _factor_projection(weights: list[torch.Tensor], moments: list[torch.Tensor | None],
                       importance: list[torch.Tensor], settings: Settings, units: int | None):
    """((B, A) per expert, the base or None, relative error, σ² [E, m]) for one projection
    type; ``units``: rank units to spend (None: what ``settings.keep`` pays for)."""
    E = len(weights)
    out_features, in_features = weights[0].shape
    base = None
    if settings.shared_basis:
        mass = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in importance])
        mass = mass if float(mass.sum()) > 0 else torch.ones(E, dtype=torch.float64)
        base = sum(float(m) * w.double() for m, w in zip(mass / mass.sum(), weights))
    factors: list[Factors] = []
    for w, cov in zip(weights, moments):
        target = w.double() - base if base is not None else w
        factors.append(factorize(target, cov, damp=settings.damp))
    limits = [len(f.energy) for f in factors]
    # an expert the sample never routes to was factored unweighted: its σ² are in other
    # units, and the data says its error costs nothing
    unseen = [settings.whiten and cov is None for cov in moments]
    energies = [f.energy * 0 if skip else f.energy for f, skip in zip(factors, unseen)]
    if settings.rank is not None:
        ranks = [min(settings.rank, m) for m in limits]
    else:
        if units is None:
            budget = projection_budget(settings.keep, E, out_features, in_features, base is not None)
            units = allocate.rank_units(budget, out_features + in_features, limits)
        choose = allocate.by_error if settings.allocation == "error" else allocate.uniform
        ranks = choose(energies, units)
    total = sum(float(f.energy.sum()) for f in factors)
    dropped = sum(f.error(r) for f, r in zip(factors, ranks))
    return ([f.truncated(r) for f, r in zip(factors, ranks)], base, dropped / total if total > 0 else 0.0,
            torch.stack(energies))
