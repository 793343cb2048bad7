"""Combine one layer's statistics, accumulated by each rank on its own rows, into what a
single process would have accumulated on all of them.

Each rank pushes the same whole batches one process would (`moekit.distributed.shard`),
so every per-token value is the one a single process computes, bit for bit; what differs
is only the order in which float64 sums are added (per rank, then across ranks). The
statistics therefore equal the single-process ones to float64 rounding (relative 1e-12
before they are stored as float32, where they almost always come out identical), counts
exactly, maxima and the hidden sample bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moekit.distributed.collectives import all_max, all_sum, all_sum_many, gather_rows
from moekit.distributed.world import World

if TYPE_CHECKING:
    from moekit.calib.observers import LayerAccumulator

_MAXIMA = {"peak"}


def reduce_accumulator(acc: LayerAccumulator, world: World) -> None:
    """Replace ``acc``'s running sums, token count, hidden sample and chosen weights by
    those of all ranks together (every rank gets the same). A collective: every rank calls
    it for the same layer in the same order."""
    sums = {n: t for n, t in acc.sums.items() if n not in _MAXIMA}
    tokens = torch.tensor([acc.tokens], dtype=torch.int64)
    reduced = all_sum_many({**sums, "_tokens": tokens}, world, f"combining layer statistics ({len(sums)} sums)")
    acc.tokens = int(reduced.pop("_tokens").item())
    acc.sums.update(reduced)
    for name in _MAXIMA & acc.sums.keys():
        acc.sums[name] = all_max(acc.sums[name], world, "combining expert peaks")
    if acc.sample_size > 0 and "hidden_sample" in acc.wanted:  # the same test on every rank
        _combine_sample(acc, world)
    if "routing_weights" in acc.wanted:
        local = torch.cat(acc._chosen) if acc._chosen else torch.zeros(0, 1)
        acc._chosen = [gather_rows(local.cpu(), world, "gathering routing weights")]


def _combine_sample(acc: LayerAccumulator, world: World) -> None:
    """The hidden sample keeps the states with the smallest keys (a hash of the seed and
    the global token position); the union of each rank's smallest holds the global
    smallest, and sorting it by key gives exactly the single process's sample, in its
    order. Only keys travel to every rank (8 bytes a state); each state itself is sent
    only when it is among the chosen, so a layer exchanges about one sample of states
    whatever the number of ranks (not one per rank)."""
    sample = acc._sample if acc._sample is not None else torch.zeros(0, acc.hidden_size)
    keys = acc._sample_keys if acc._sample_keys is not None else torch.zeros(0, dtype=torch.int64)
    every_key = gather_rows(keys.cpu(), world, "gathering the hidden sample's keys")
    cut = every_key.sort().values[: acc.sample_size]
    chosen = torch.isin(keys.cpu(), cut)  # this rank's states that are in the global sample
    pool = gather_rows(sample.cpu()[chosen], world, "gathering the hidden sample")
    pool_keys = gather_rows(keys.cpu()[chosen], world, "gathering the hidden sample")
    order = pool_keys.argsort()
    device = sample.device
    acc._sample, acc._sample_keys = pool[order].to(device), pool_keys[order].to(device)


def reduce_sums(values: dict[str, float | int], world: World, what: str) -> dict[str, float]:
    """Python scalars summed over ranks in float64 (evaluation's losses and counts)."""
    names = sorted(values)
    total = all_sum(torch.tensor([float(values[n]) for n in names], dtype=torch.float64), world, what)
    return dict(zip(names, total.tolist(), strict=True))


def combine_hessian(hessian, world: World) -> None:
    """A GPTQ `HessianAccumulator` of this rank's rows becomes that of every rank's: its
    Σ w·x·xᵀ, token count and total weight are plain sums."""
    counts = torch.tensor([hessian.tokens, hessian.total_weight], dtype=torch.float64)
    reduced = all_sum_many({"xtx": hessian.xtx, "counts": counts}, world, "combining Hessians")
    hessian.xtx = reduced["xtx"]
    hessian.tokens, hessian.total_weight = int(reduced["counts"][0].item()), float(reduced["counts"][1].item())


def gather_batches(batches: list[torch.Tensor], world: World, width: int, what: str) -> list[torch.Tensor]:
    """Per-token rows a layer's batches gave on this rank ([n_b, width] each) → every
    rank's, as one tensor in the order one process would have produced them."""
    local = torch.cat([b.cpu() for b in batches]) if batches else torch.zeros(0, width)
    return [gather_rows(local, world, what)]
