"""Splitting a dense MLP into experts (MoEfication, Zhang et al. 2022, arXiv 2110.01786;
LLaMA-MoE, Zhu et al. 2024, arXiv 2406.16554).

A SwiGLU MLP is a sum over its I neurons, MLP(x) = Σ_i down[:, i]·σ(gate_i·x)(up_i·x), so
cutting the neurons into E disjoint sets gives E experts whose outputs sum to the MLP's:
Σ_e f_e(x) = MLP(x) exactly. An MoE keeps only the k experts its router picks, so how the
neurons are grouped and how the router is initialised decide how much of the MLP survives.

- ``random``: a seeded permutation cut into E equal parts (LLaMA-MoE's random split).
- ``cluster``: balanced k-means (E clusters of exactly I/E neurons) on the neurons' gate
  and up rows, normalised: neurons that read the input alike land in one expert (MoEfication's
  parameter clustering, LLaMA-MoE's clustering split).
- ``coactivation``: the same balanced k-means on the rows of the neurons' co-activation
  matrix on calibration tokens (a neuron is active on a token when it is among that
  token's top tenth by |activation|): neurons that fire together land in one expert, so
  the k experts a token needs hold most of its active neurons (MoEfication's co-activation
  graph, partitioned by clustering rather than a graph partitioner).

The router is fitted on calibration data: each expert's output norm ‖f_e(x)‖ on the layer's
real inputs is regressed on x by ridge least squares, so the top-k logits point at the
experts with the largest outputs (MoEfication's learned expert selection, fitted in closed
form). Its scale is then shrunk so the renormalised top-k weights start near 1/k, and
every expert's down projection is multiplied by k: the block starts as Σ_{top-k} f_e(x), the
dense MLP restricted to the chosen neurons. The report gives, per layer, the share of the
dense MLP's output (1 − ‖MLP − MoE‖² / ‖MLP‖²) this reproduces on held-out tokens, and the
share an oracle choosing the k largest experts would reproduce.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from moekit.errors import MoekitError

By = Literal["random", "cluster", "coactivation"]
ACTIVE = 0.1  # a neuron counts as active on a token when it is among the token's top tenth by |activation|
HELD_OUT = 0.25  # the share of calibration tokens kept out of the router's fit, to score it


def partition(gate: torch.Tensor, up: torch.Tensor, experts: int, *, by: By, generator: torch.Generator,
              iterations: int = 10, activations: torch.Tensor | None = None) -> list[torch.Tensor]:
    """E disjoint sorted index sets of I/E neurons each, covering all I (gate, up [I, H];
    ``activations`` [N, I] on calibration tokens, for ``coactivation``)."""
    neurons = gate.shape[0]
    size = neurons // experts
    if by == "random":
        order = torch.randperm(neurons, generator=generator)
        return [order[e * size:(e + 1) * size].sort().values for e in range(experts)]
    if by == "coactivation":
        if activations is None:
            raise ValueError("coactivation needs the neurons' activations on calibration tokens")
        magnitude = activations.abs()
        active = (magnitude >= magnitude.quantile(1 - ACTIVE, dim=1, keepdim=True)).float()  # [N, I]
        features = torch.nn.functional.normalize(active.T @ active, dim=1)  # co-activation rows [I, I]
    else:
        features = torch.nn.functional.normalize(torch.cat([gate, up], dim=1).float(), dim=1)
    centroids = features[torch.randperm(neurons, generator=generator)[:experts]]
    for _ in range(iterations):
        owner = _balanced_assignment(torch.cdist(features, centroids), size)
        centroids = torch.stack([features[owner == e].mean(0) for e in range(experts)])
    return [torch.where(owner == e)[0] for e in range(experts)]


def _balanced_assignment(distance: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row to a column, every column taking exactly ``capacity`` rows: pairs are taken
    greedily from the closest (a row and a column each stop when assigned / full)."""
    rows, columns = distance.shape
    owner = torch.full((rows,), -1, dtype=torch.long)
    load = [0] * columns
    for flat in distance.flatten().argsort().tolist():
        row, column = divmod(flat, columns)
        if owner[row] < 0 and load[column] < capacity:
            owner[row] = column
            load[column] += 1
    return owner


def expert_outputs(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   groups: list[torch.Tensor], act=torch.nn.functional.silu) -> torch.Tensor:
    """f_e(x) for every expert: [E, N, H] from x [N, H]."""
    return torch.stack([(act(x @ gate[g].T) * (x @ up[g].T)) @ down[:, g].T for g in groups])


def fit_router(x: torch.Tensor, outputs: torch.Tensor, *, ridge: float = 1e-2, spread: float = 0.01) -> torch.Tensor:
    """Router rows [E, H]: ridge regression of each expert's output norm (outputs [E, N, H])
    on x [N, H], then shrunk so the logits' standard deviation is ``spread``."""
    target = outputs.norm(dim=-1).T.double()  # [N, E]
    target = target - target.mean(0)
    features = x.double()
    gram = features.T @ features
    gram += ridge * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    rows = torch.linalg.solve(gram, features.T @ target).T  # [E, H]
    scale = (features @ rows.T).std().clamp(min=1e-12)
    return (rows * (spread / scale)).float()


def reproduced_share(mlp: torch.Tensor, outputs: torch.Tensor, chosen: torch.Tensor,
                     weights: torch.Tensor) -> float:
    """1 − ‖MLP − Σ_{chosen} w·f‖² / ‖MLP‖² over tokens (mlp [N, H], outputs [E, N, H],
    chosen and weights [N, k])."""
    picked = outputs.permute(1, 0, 2).gather(1, chosen[..., None].expand(-1, -1, outputs.shape[2]))  # [N, k, H]
    approx = (picked * weights[..., None]).sum(1)
    return float(1 - ((mlp - approx) ** 2).sum() / (mlp**2).sum().clamp(min=1e-30))


def split(dense: str | os.PathLike, *, out_dir: str | os.PathLike, experts: int, top_k: int, by: By = "cluster",
          data: str = "stdlib:calib", n_samples: int = 16, seq_len: int = 256, seed: int = 0,
          tokenizer: str | os.PathLike | None = None) -> dict:
    """Write the MoE split from the dense checkpoint ``dense`` into the new folder ``out_dir``
    (see the module docstring): the dense model streams one layer at a time over the
    calibration rows, whose MLP inputs fit each layer's router. Returns the report.

    Raises:
        MoekitError: before any weight is read, for an existing ``out_dir``, a model that is
            not a dense model moekit splits, an expert count that does not divide the MLP
            width, a top-k outside 1..experts; before the split, for unusable data.
    """
    from moekit.build.upcycle import TARGETS, moe_config
    from moekit.build.writer import DenseSource, MlpInputs, write_moe
    from moekit.data.tokens import calibration_tokens
    from moekit.io.tokenizer import tokenizer_for

    source = DenseSource.open(dense, out_dir)
    if source.config.model_type not in TARGETS:
        raise MoekitError(f"cannot split a {source.config.model_type!r} model; moekit splits dense "
                          f"{', '.join(sorted(TARGETS))} models.")
    width = source.config.intermediate_size
    if not 1 <= top_k <= experts or width % experts:
        raise MoekitError(f"--experts {experts} must divide the MLP width {width} and --top-k {top_k} must be "
                          f"between 1 and --experts.")
    ids = calibration_tokens(data, tokenizer_for(str(source.folder), tokenizer), n_samples=n_samples,
                             seq_len=seq_len, seed=seed).input_ids
    stream = MlpInputs(source.folder, ids)
    generator = torch.Generator().manual_seed(seed)

    def experts_of(index: int, mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        gate, up, down = mlp
        x = stream.at(index)
        fit = int(x.shape[0] * (1 - HELD_OUT))
        activations = None
        if by == "coactivation":
            activations = torch.nn.functional.silu(x[:fit] @ gate.T) * (x[:fit] @ up.T)
        groups = partition(gate, up, experts, by=by, generator=generator, activations=activations)
        outputs = expert_outputs(x, gate, up, down, groups)
        router = fit_router(x[:fit], outputs[:, :fit])
        held, dense_out = outputs[:, fit:], outputs[:, fit:].sum(0)
        logits = x[fit:] @ router.T
        chosen = logits.topk(top_k, dim=-1).indices
        weights = logits.softmax(-1).gather(1, chosen)
        weights = weights / weights.sum(-1, keepdim=True) * top_k  # the scaled down projections
        oracle = held.norm(dim=-1).T.topk(top_k, dim=-1).indices
        report = {"reproduced_share": round(reproduced_share(dense_out, held, chosen, weights), 4),
                  "oracle_share": round(reproduced_share(dense_out, held, oracle, torch.ones_like(weights)), 4)}
        gate_up = torch.stack([torch.cat([gate[g], up[g]]) for g in groups])
        downs = torch.stack([down[:, g] * top_k for g in groups])
        return gate_up, downs, router, report

    report = {"dense": str(source.folder), "experts": experts, "top_k": top_k, "by": by,
              "expert_width": width // experts, "seed": seed, "calibration": {"data": data, "rows": n_samples,
                                                                              "seq_len": seq_len}}
    return write_moe(source, moe_config(source.config, experts=experts, top_k=top_k, width=width // experts),
                     experts_of, report=report, name="split.json")
