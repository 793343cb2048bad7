"""Which rows each rank works on.

Rows are shared out in whole batches, contiguously and in order: rank r gets batches
⌊B·r/W⌋ … ⌊B·(r+1)/W⌋ − 1 of the B batches a single process would run. Every batch is thus
the very tensor one process pushes (same rows, same padding, same shape), so each token's
hidden states, routing and expert outputs are bit for bit the single process's; only the
order of summation differs. Concatenating per-token results in rank order gives the
single process's order, and the first token of rank r has the global position the hidden
sample's keys are hashed from.
"""

from __future__ import annotations

from moekit.distributed.world import World
from moekit.errors import MoekitError


def my_batches(count: int, world: World | None) -> range:
    """The indices of the batches this rank runs, of ``count`` in all."""
    if world is None:
        return range(count)
    if count < world.size:
        raise MoekitError(
            f"{count} batch(es) of rows cannot be shared by {world.size} ranks: each rank needs at least one. "
            f"Use more rows (calibration: --samples; evaluation: more tokens) or a smaller --batch-size, or start "
            f"fewer processes (--nproc-per-node)."
        )
    return range(count * world.rank // world.size, count * (world.rank + 1) // world.size)
