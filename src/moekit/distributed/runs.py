"""What a compress across ranks adds to a one-process compress: agreement on its inputs,
one work folder per rank, agreement on where a resumed run starts, and the hand-over to
rank 0 for the output.

Every rank keeps its own work folder (its share of the hidden states after each finished
layer) next to the output: rank 0's is the usual ``.<out>.moekit-work/``, rank r's
``.<out>.moekit-work.rank<r>/``. Rank 0 alone writes shards and the output; once the pass
is over, the ranks meet once more and rank 0 removes the others' folders when it is done.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from moekit.distributed.agree import agree_inputs, weights_index
from moekit.distributed.collectives import answered, gather_objects
from moekit.distributed.world import World
from moekit.errors import MoekitError

RANK_SUFFIX = ".rank"


def agree_compress(facts: dict[str, Any], lent, world: World | None) -> None:
    """`agree_inputs` on a compress's run facts, with the checkpoint described by its
    tensors and file sizes (each node may hold its own copy, at its own path)."""
    if world is None:
        return
    shared = {k: v for k, v in facts.items() if k not in ("model", "checkpoint files")}
    agree_inputs({**shared, "weights": weights_index(lent)}, world, "compress")


def rank_work_path(path: Path, world: World | None) -> Path:
    """Where this rank keeps its work folder."""
    return path if world is None or world.main else path.with_name(f"{path.name}{RANK_SUFFIX}{world.rank}")


def agree_progress(work, world: World | None) -> None:
    """A resumed run starts at the same layer on every rank. Ranks meet after each layer
    before committing it (`layer_done`), so after a rank died they are at most one layer
    apart: the ones ahead step back to the others' last layer. Refused (naming each rank's
    progress) when that is not possible."""
    if world is None:
        return
    work.keep_previous = True
    finished = work.finished_layers()
    last = finished[-1] if finished else -1
    can_step_back = last <= 0 or work.hidden_folder(last - 1).is_dir()
    everyone = gather_objects((last, can_step_back), world, "comparing the ranks' finished layers")
    common = min(n for n, _ in everyone)  # every rank decides from the same list: all resume, or all refuse
    if any(n - common > 1 or (n > common and not back) for n, back in everyone):
        described = ", ".join(f"rank {r}: {'none' if n < 0 else f'0..{n}'}" for r, (n, _) in enumerate(everyone))
        raise MoekitError(f"the ranks' work folders finished different layers ({described}) and cannot resume "
                          "together; delete the work folders (.<out>.moekit-work*) to start over.")
    if last > common:
        work.forget(last)
        work.resumed = common >= 0


def layer_done(world: World | None, index: int) -> None:
    """Every rank has computed decoder layer ``index``; only then does each commit it."""
    if world is None:
        return
    with answered(world, f"finishing layer {index}"):
        dist.barrier()


def pass_done(world: World | None) -> None:
    """Every rank has finished (and committed) its last layer: meet, so that rank 0 writes
    the output, and removes the others' work folders, only once none is still writing."""
    if world is None:
        return
    with answered(world, "finishing the pass"):
        dist.barrier()


def remove_rank_folders(work_path: Path) -> None:
    """Rank 0, its output written: the other ranks' work folders it can see (all of them on
    one machine or a shared file system; on other nodes' own disks they stay)."""
    for folder in work_path.parent.glob(f"{work_path.name}{RANK_SUFFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)
