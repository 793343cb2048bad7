"""Sparse upcycling: a dense model becomes an MoE whose experts start from its MLPs.

Methods (each layer's MLP gate G [I, H], up U [I, H], down D [H, I]):

- ``copy`` (Sparse Upcycling, Komatsuzaki et al. 2022, arXiv 2212.05055): every expert is
  (G, U, D); the router starts small and random. The families written here renormalise
  the top-k weights (Σ_selected g_j = 1), so at step 0 the block outputs
  Σ_j g_j·MLP(x) = MLP(x): the upcycled model computes the dense model's logits.
- ``virtual-groups`` (NVIDIA, "Upcycling Large Language Models into Mixture of Experts",
  arXiv 2410.07524): the MLP's I neurons are cut into ``groups`` shards of I/G (a SwiGLU
  MLP is a sum over its neurons, so MLP(x) = Σ_s MLP_s(x)); expert j holds shard j mod G,
  and the experts j // G = v form virtual group v, all with router row R_v. Equal rows
  tie, so top-k (k a multiple of G) selects whole groups, every shard k/G times, each
  weight 1/k after renormalisation: the block outputs (1/k)·(k/G)·Σ_s MLP_s(x) = MLP(x)/G.
  Scaling every expert's down projection by G restores MLP(x) exactly. (Megatron's
  ``_get_weight_scale`` factor applies when top-k weights are not renormalised.)
- ``drop`` (Drop-Upcycling, arXiv 2502.19261): ``copy``, then in each expert a random share
  ``drop_ratio`` of the intermediate neurons is re-initialised from the normal
  distribution of the dense weights' mean and standard deviation (per matrix); no longer
  equal to the dense model at step 0, by design.

With ``family="glm4_moe"`` (DeepSeek-V3-style: sigmoid router, selection bias, one
ungated shared expert beside the routed ones; GLM-4.5's layer has Qwen3's attention with
per-head q/k norms) the shared expert is a copy of the whole MLP whose down projection is
scaled by ``shared_fraction`` = α and every routed expert's by 1 − α: at step 0 the block
outputs α·MLP(x) + (1 − α)·MLP(x) = MLP(x) for ``copy`` and ``virtual-groups``.

Attention, norms, embeddings and head are copied. The model is built one decoder layer at
a time from the dense checkpoint and written as a standard checkpoint of the MoE family.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from moekit.arch.adapters.dense import TARGETS, Target
from moekit.errors import MoekitError

Method = Literal["copy", "virtual-groups", "drop"]

def target_of(dense: Any, family: str | None) -> Target:
    """The MoE family ``dense`` becomes (``None``: its default), or a refusal naming the choices."""
    model_type = getattr(dense, "model_type", None)
    if model_type not in TARGETS:
        hint = " It is already an MoE." if any(k in dense.to_dict() for k in ("num_experts", "num_local_experts",
                                                                                "n_routed_experts")) else ""
        targets = sorted({t for options in TARGETS.values() for t in options})
        raise MoekitError(f"cannot upcycle a {model_type!r} model.{hint} moekit upcycles dense "
                          f"{', '.join(sorted(TARGETS))} models into {', '.join(targets)}.")
    options = TARGETS[model_type]
    if family is None:
        return next(iter(options.values()))
    if family not in options:
        raise MoekitError(f"a {model_type} model cannot become {family!r}; choose --family "
                          f"{' or '.join(options)} (the families whose layers hold its attention unchanged).")
    return options[family]


def moe_config(dense: Any, *, experts: int, top_k: int, width: int, family: str | None = None):
    """The MoE family's config for ``dense``'s config: every dense field it shares, then
    the experts (``width`` neurons each; a shared expert as wide as the dense MLP)."""
    from transformers import AutoConfig

    target = target_of(dense, family)
    values = {k: v for k, v in dense.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype")}
    values.update(target.extras, **{target.experts_key: experts, target.width_key: width,
                                    "num_experts_per_tok": top_k, "output_router_logits": False})
    if target.shared_expert:
        values["n_shared_experts"] = dense.intermediate_size // width
    return AutoConfig.for_model(target.model_type, **values)


def check_upcycle(dense: Any, *, experts: int, top_k: int, method: Method, groups: int,
                  drop_ratio: float, family: str | None = None, shared_fraction: float = 0.5) -> int:
    """Refuse what cannot be built, before any weight is read; returns each expert's width."""
    if target_of(dense, family).shared_expert and not 0 < shared_fraction < 1:
        raise MoekitError(f"--shared-fraction {shared_fraction} must be strictly between 0 and 1 (the shared "
                          "expert's share of the dense MLP's output at step 0).")
    if not 1 <= top_k <= experts:
        raise MoekitError(f"--top-k {top_k} must be between 1 and --experts {experts}.")
    inner = dense.intermediate_size
    if method != "virtual-groups":
        if not 0 < drop_ratio <= 1 and method == "drop":
            raise MoekitError(f"--drop-ratio {drop_ratio} must be in (0, 1].")
        return inner
    if groups < 1 or inner % groups or experts % groups or top_k % groups:
        raise MoekitError(f"virtual-groups needs --groups G dividing the MLP width {inner}, --experts {experts} and "
                          f"--top-k {top_k} (every shard must be chosen equally); G = {groups} does not.")
    return inner // groups


@torch.no_grad()
def expert_tensors(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, experts: int, method: Method,
                   groups: int, drop_ratio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2I', H], down [E, H, I']) of one layer's experts from its dense MLP
    (gate, up [I, H], down [H, I]), in transformers' fused layout."""
    if method == "virtual-groups":
        width = gate.shape[0] // groups
        shards = [(gate[s * width:(s + 1) * width], up[s * width:(s + 1) * width],
                   down[:, s * width:(s + 1) * width] * groups) for s in range(groups)]
        chosen = [shards[j % groups] for j in range(experts)]
    else:
        chosen = [(gate.clone(), up.clone(), down.clone()) for _ in range(experts)]
    if method == "drop":
        for g, u, d in chosen:
            neurons = torch.randperm(g.shape[0], generator=generator)[: round(drop_ratio * g.shape[0])]
            for matrix, rows in ((g, True), (u, True), (d, False)):
                source = gate if matrix is g else up if matrix is u else down
                fresh = torch.randn(source.shape[1] if rows else source.shape[0], len(neurons), generator=generator)
                fresh = fresh * source.float().std() + source.float().mean()
                if rows:
                    matrix[neurons] = fresh.T.to(matrix.dtype)
                else:
                    matrix[:, neurons] = fresh.to(matrix.dtype)
    gate_up = torch.stack([torch.cat([g, u]) for g, u, _ in chosen])
    return gate_up, torch.stack([d for _, _, d in chosen])


def router_rows(experts: int, hidden: int, *, method: Method, groups: int, generator: torch.Generator,
                std: float = 0.02) -> torch.Tensor:
    """[E, H]: small random rows; with virtual groups, one row per group, repeated."""
    if method != "virtual-groups":
        return torch.randn(experts, hidden, generator=generator) * std
    per_group = torch.randn(experts // groups, hidden, generator=generator) * std
    return per_group.repeat_interleave(groups, dim=0)


def upcycle(dense: str | os.PathLike, *, out_dir: str | os.PathLike, experts: int, top_k: int,
            method: Method = "copy", groups: int = 1, drop_ratio: float = 0.5, family: str | None = None,
            shared_fraction: float = 0.5, seed: int = 0) -> dict:
    """Write the MoE upcycled from the dense checkpoint ``dense`` into the new folder
    ``out_dir`` (see the module docstring), one decoder layer at a time. Returns a report.

    Raises:
        MoekitError: before any weight is read, for an existing ``out_dir``, a model that is
            not a dense model of a family moekit upcycles, or sizes the method cannot use.
    """
    from moekit.build.writer import DenseSource, step_zero_difference, write_moe

    source = DenseSource.open(dense, out_dir)
    width = check_upcycle(source.config, experts=experts, top_k=top_k, method=method, groups=groups,
                          drop_ratio=drop_ratio, family=family, shared_fraction=shared_fraction)
    shared = target_of(source.config, family).shared_expert
    generator = torch.Generator().manual_seed(seed)

    def experts_of(index: int, mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        gate_up, down = expert_tensors(*mlp, experts=experts, method=method, groups=groups, drop_ratio=drop_ratio,
                                       generator=generator)
        router = router_rows(experts, gate_up.shape[2], method=method, groups=groups, generator=generator)
        return gate_up, down * (1 - shared_fraction) if shared else down, router, {}

    def shared_expert(index: int, mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        gate, up, down = mlp
        return gate, up, down * shared_fraction

    report = {"dense": str(source.folder), "experts": experts, "top_k": top_k, "method": method,
              "expert_width": width, "seed": seed, **({"groups": groups} if method == "virtual-groups" else {}),
              **({"drop_ratio": drop_ratio} if method == "drop" else {}),
              **({"shared_expert_width": source.config.intermediate_size, "shared_fraction": shared_fraction}
                 if shared else {})}
    def kept(folder) -> dict:  # the methods that keep the dense function: what they kept of it
        if method == "drop":
            return {}
        return {"max_abs_logit_difference": step_zero_difference(source.folder, folder, source.config.vocab_size)}

    config = moe_config(source.config, experts=experts, top_k=top_k, width=width, family=family)
    return write_moe(source, config, experts_of, report=report, name="upcycle.json", measure=kept,
                     shared_expert=shared_expert if shared else None)
