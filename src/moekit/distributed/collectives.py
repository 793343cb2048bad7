"""The few collectives moekit uses, with one clear error when another rank is gone.

Every statistic moekit collects is either a sum over tokens (counts, sums, sums of
squares, Gram matrices: `all_sum`), a maximum (`all_max`), or a set of per-token rows
(the hidden sample, chosen routing weights: `gather_rows`, in rank order). Tensors travel
in their own dtype (float64 sums stay float64) on the group's device and come back where
they were. ``traffic`` counts the bytes each rank hands to collectives and the time spent
in them, for benchmarks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from moekit.distributed.world import World
from moekit.errors import MoekitError

traffic = {"bytes": 0, "calls": 0, "seconds": 0.0}  # seconds: in collectives, waiting for the others included


@contextlib.contextmanager
def answered(world: World, what: str) -> Iterator[None]:
    """Turn a collective that failed because another rank died, hung past the timeout or
    disagreed into one line saying so (gloo and nccl raise RuntimeError subclasses)."""
    start = time.perf_counter()
    try:
        yield
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MoekitError(
            f"rank {world.rank}/{world.size}: {what} failed: another rank stopped or did not answer within "
            f"{world.timeout:g}s ({detail}). See that rank's output for why; `moekit compress` continues from the "
            f"last layer every rank finished when rerun with --resume (set the wait with $MOEKIT_DIST_TIMEOUT)."
        ) from None
    finally:
        traffic["seconds"] += time.perf_counter() - start


def _count(tensor: torch.Tensor) -> None:
    traffic["bytes"] += tensor.numel() * tensor.element_size()
    traffic["calls"] += 1


def all_sum(tensor: torch.Tensor, world: World, what: str = "summing statistics") -> torch.Tensor:
    """The sum of ``tensor`` over ranks (same shape and dtype on every rank)."""
    return _reduce(tensor, world, dist.ReduceOp.SUM, what)


def all_max(tensor: torch.Tensor, world: World, what: str = "taking maxima") -> torch.Tensor:
    return _reduce(tensor, world, dist.ReduceOp.MAX, what)


def _reduce(tensor: torch.Tensor, world: World, op, what: str) -> torch.Tensor:
    buffer = tensor.detach().to(world.device).contiguous().clone()
    _count(buffer)
    with answered(world, what):
        dist.all_reduce(buffer, op=op)
    return buffer.to(tensor.device)


def all_sum_many(tensors: dict[str, torch.Tensor], world: World, what: str) -> dict[str, torch.Tensor]:
    """`all_sum` of several tensors in one collective per dtype (one message, not one per
    statistic: latency, not bandwidth, dominates small statistics)."""
    out: dict[str, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name in sorted(tensors):  # the same order on every rank
        by_dtype.setdefault(tensors[name].dtype, []).append(name)
    for dtype, names in by_dtype.items():
        flat = torch.cat([tensors[n].detach().reshape(-1).to(world.device) for n in names])
        flat = _reduce(flat, world, dist.ReduceOp.SUM, what)
        offset = 0
        for n in names:
            size = tensors[n].numel()
            out[n] = flat[offset: offset + size].view(tensors[n].shape).to(tensors[n].device)
            offset += size
    return out


def gather_rows(tensor: torch.Tensor, world: World, what: str = "gathering samples") -> torch.Tensor:
    """Every rank's rows [n_r, ...] concatenated in rank order (n_r may differ)."""
    local = tensor.detach().to(world.device).contiguous()
    sizes = [torch.zeros(1, dtype=torch.int64, device=world.device) for _ in range(world.size)]
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=world.device)
    _count(count)
    with answered(world, what):
        dist.all_gather(sizes, count)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=world.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    _count(padded)
    with answered(world, what):
        dist.all_gather(parts, padded)
    return torch.cat([p[: int(n.item())] for p, n in zip(parts, sizes, strict=True)]).to(tensor.device)


def gather_objects(obj, world: World, what: str) -> list:
    """Small picklable objects (run descriptions), one per rank, in rank order."""
    out: list = [None] * world.size
    with answered(world, what):
        dist.all_gather_object(out, obj)
    return out


def reduce_sums(values: dict[str, float | int], world: World, what: str) -> dict[str, float]:
    """Python scalars summed over ranks in float64 (evaluation's losses and counts)."""
    names = sorted(values)
    total = all_sum(torch.tensor([float(values[n]) for n in names], dtype=torch.float64), world, what)
    return dict(zip(names, total.tolist(), strict=True))


def gather_batches(batches: list[torch.Tensor], world: World, width: int, what: str) -> list[torch.Tensor]:
    """Per-token rows a layer's batches gave on this rank ([n_b, width] each) → every
    rank's, as one tensor in the order one process would have produced them."""
    local = torch.cat([b.cpu() for b in batches]) if batches else torch.zeros(0, width)
    return [gather_rows(local, world, what)]
