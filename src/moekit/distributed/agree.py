"""Every rank must run the same job: checked at the start, and after each edit.

A rank started with another recipe, another checkpoint or other data would silently mix
statistics of different runs, so the ranks compare what they were given before any work
(`agree_inputs`) and refuse, naming what differs. After a step edits a layer, every rank
holds its own copy of the edit, computed from identical statistics by the same code;
`agree_layer` checks that the copies are the same (a cheap checksum per tensor) and, should
a nondeterministic kernel have made them drift (some GPU ops are), makes every rank take
rank 0's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.collectives import answered, gather_objects
from moekit.distributed.world import World
from moekit.errors import MoekitError


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def agree_inputs(facts: dict[str, Any], world: World | None, what: str) -> None:
    """Refuse, on every rank, when the ranks were not given the same ``facts`` (recipe,
    model, data, settings), naming each fact that differs and the ranks that differ."""
    if world is None:
        return
    mine = {name: digest(value) for name, value in facts.items()}
    everyone = gather_objects(mine, world, f"comparing the {what} inputs of the ranks")
    differ = sorted({name for theirs in everyone for name in set(theirs) | set(mine)
                     if theirs.get(name) != everyone[0].get(name)})
    if differ:
        ranks = [r for r, theirs in enumerate(everyone) if theirs != everyone[0]]
        raise MoekitError(
            f"the ranks of this {what} were not given the same inputs: rank(s) {', '.join(map(str, ranks))} were "
            f"given another {' and '.join(differ)} than rank 0. Start every rank with the same command line, "
            f"model files and data (on several nodes: the same checkpoint and moekit version on each)."
        )


def weights_index(lent) -> dict[str, Any]:
    """The checkpoint as every node sees it: tensor names, dtypes, shapes and file sizes
    (not modification times, which differ between copies on different nodes)."""
    if lent.checkpoint is None:  # a model in memory: its parameters' names and shapes
        return {name: list(p.shape) for name, p in lent.model.named_parameters()}
    entries = lent.checkpoint.tensors
    files = sorted({e.file for e in entries.values()})
    return {"tensors": digest([[n, str(entries[n].dtype), list(entries[n].shape)] for n in sorted(entries)]),
            "files": [[f.name, f.stat().st_size] for f in files]}


def _checksums(module: nn.Module) -> torch.Tensor:
    """Per tensor: float64 sum and sum of squares of its values (a drift in any element
    shows; a permutation of experts shows through the names' shapes)."""
    values = []
    for tensor in [*module.parameters(), *module.buffers()]:
        t = tensor.detach()
        if t.is_floating_point():
            t = t.double()
            values += [t.sum(), (t * t).sum()]
        else:
            values += [t.double().sum(), torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device)]
    return torch.stack(values).cpu() if values else torch.zeros(0, dtype=torch.float64)


def agree_layer(module: nn.Module, world: World | None, index: int) -> bool:
    """Make every rank's edited decoder layer ``index`` rank 0's. Returns True when the
    ranks had drifted apart and rank 0's copy was sent (False: they were identical)."""
    if world is None:
        return False
    shapes = [(name, tuple(t.shape), str(t.dtype)) for name, t in
              [*module.named_parameters(), *module.named_buffers()]]
    described = gather_objects((digest(shapes), _checksums(module).tolist()), world,
                               f"comparing layer {index} across ranks")
    if any(d[0] != described[0][0] for d in described):
        raise MoekitError(f"the ranks edited layer {index} into different shapes (e.g. kept different experts): their "
                          "statistics or code differ. Start every rank with the same moekit version and inputs.")
    if all(d[1] == described[0][1] for d in described):
        return False
    with answered(world, f"sending rank 0's layer {index}"):
        for tensor in [*module.parameters(), *module.buffers()]:
            buffer = tensor.detach().to(world.device).contiguous()
            dist.broadcast(buffer, src=0)
            tensor.data.copy_(buffer.to(tensor.device))
    return True
