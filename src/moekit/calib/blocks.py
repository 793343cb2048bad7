"""Statistics of whole decoder layers and their MoE sublayers, for dropping them.

The criterion of the Unified MoE compression study (He et al. 2024, "Demystifying the
Compression of Mixture-of-Experts Through a Unified Framework", arXiv 2406.02500, after
"What Matters in Transformers?", arXiv 2406.15786): a module whose output is nearly its
input changes the residual stream little, so it is dropped first. With X what enters and
Y what leaves, over calibration tokens x:

- ``block_change``: mean over tokens of 1 − cos(X(x), Y(x)) for the decoder layer (X its
  input, Y its output);
- ``mlp_change``: the same for the MoE sublayer, X the residual stream entering it and
  Y = X + (its contribution). X is measured, not reconstructed: the layer is run once
  more with the sublayer replaced by the zero module a drop leaves (`DroppedMLP`), which
  is exactly the residual stream before it, whatever the family's residual arithmetic
  (Granite's multiplier, a shared MLP beside the block);
- ``block_loss`` / ``mlp_loss``: the measured increase of the model's mean next-token
  loss on the calibration rows when that one layer (sublayer) alone is dropped — each
  candidate is a stream of hidden states that skips it and runs through every later
  layer as it is lent, so it stays one layer at a time (it costs L(L+1)/2 layer forwards
  and one stream per candidate, spilled to files above the activation budget).

Each is a one-element tensor per decoder layer (the ``*_mlp`` ones for MoE layers only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

BLOCK_STATISTICS = {
    "block_change": "[1] mean over tokens of 1 − cos(input, output) of the decoder layer",
    "mlp_change": "[1] mean over tokens of 1 − cos(X, X + MoE sublayer's contribution), X the residual stream "
                  "entering the sublayer (MoE layers)",
    "block_loss": "[1] increase of the mean next-token loss when this decoder layer alone is dropped",
    "mlp_loss": "[1] increase of the mean next-token loss when this layer's MoE sublayer alone is dropped",
}
LOSS_STATISTICS = frozenset({"block_loss", "mlp_loss"})


@contextmanager
def sublayer_dropped(layer: nn.Module, family) -> Iterator[None]:
    """While open, decoder ``layer``'s MoE sublayer (block, and a shared MLP beside it) is
    the zero module `moekit.arch.edit.drop_mlp` leaves."""
    from moekit.arch.edit import DroppedMLP

    block = getattr(layer, family.block)
    shared = None
    if family.shared is not None and not family.shared.mlp.startswith(f"{family.block}."):
        owner, _, name = family.shared.mlp.rpartition(".")
        holder = layer.get_submodule(owner) if owner else layer
        shared = (holder, name, getattr(holder, name, None))
    setattr(layer, family.block, DroppedMLP(pair=family.block_returns_pair))
    if shared is not None:
        setattr(shared[0], shared[1], None)
    try:
        yield
    finally:
        setattr(layer, family.block, block)
        if shared is not None:
            setattr(shared[0], shared[1], shared[2])


def _change(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of 1 − cos(x, y); x, y [..., H]."""
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    return (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)).sum()


@torch.no_grad()
def forward_measuring(streamer, index: int, layer: nn.Module, hidden, *, family, moe: bool, wanted,
                      observe: AbstractContextManager | None = None, on_batch=None) -> dict[str, torch.Tensor]:
    """`LayerStreamer.forward` of ``layer`` over ``hidden`` (advancing it), measuring the
    ``*_change`` statistics of ``wanted`` on the way (``moe``: the layer has an MoE
    sublayer). ``observe`` (e.g. the MoE observers' hook on the block) stays open; the
    extra run without the sublayer sets the block it watches aside, so it sees each batch
    once."""
    sums = {"block_change": torch.zeros((), dtype=torch.float64), "mlp_change": torch.zeros((), dtype=torch.float64)}
    tokens = 0
    with observe if observe is not None else nullcontext():  # (the block it watches is set aside while dropped)
        for b in range(len(hidden)):
            tokens += _measure_batch(streamer, index, layer, hidden, b, family, moe, wanted, sums)
            if on_batch is not None:
                on_batch(b)
    if streamer.world is not None:  # each rank measured its share of the rows
        from moekit.distributed import reduce_sums

        total = reduce_sums({**{k: float(v) for k, v in sums.items()}, "tokens": tokens}, streamer.world,
                            f"combining layer {index}'s change")
        sums = {k: torch.tensor(total[k], dtype=torch.float64) for k in sums}
        tokens = int(total["tokens"])
    result = {}
    if "block_change" in wanted:
        result["block_change"] = (sums["block_change"] / max(tokens, 1)).reshape(1).float()
    if moe and "mlp_change" in wanted:
        result["mlp_change"] = (sums["mlp_change"] / max(tokens, 1)).reshape(1).float()
    return result


def _measure_batch(streamer, index: int, layer: nn.Module, hidden, b: int, family, moe: bool, wanted,
                   sums: dict[str, torch.Tensor]) -> int:
    """One batch of `forward_measuring`; returns its token count."""
    from moekit.calib.runner import _to

    call = streamer.calls[b][index]
    x = hidden[b].to(streamer.device)
    args, kwargs = _to(call.args, streamer.device), _to(call.kwargs, streamer.device)
    without = None
    if moe and "mlp_change" in wanted:
        with sublayer_dropped(layer, family):
            without = layer(x, *args, **kwargs)
        without = without[0] if isinstance(without, tuple) else without
    out = layer(x, *args, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    sums["block_change"] += _change(x, y)
    if without is not None:
        sums["mlp_change"] += _change(without, y)
    hidden[b] = y
    return x.shape[:-1].numel()


@torch.no_grad()
def forward_without_sublayer(streamer, index: int, layer: nn.Module, hidden, family) -> None:
    """Advance ``hidden`` through ``layer`` with its MoE sublayer dropped."""
    with sublayer_dropped(layer, family):
        streamer.forward(index, layer, hidden)


@torch.no_grad()
def mean_loss(streamer, hidden) -> float:
    """The mean next-token loss of the rows whose last decoder layer left ``hidden``."""
    total, count = 0.0, 0
    for b in range(len(hidden)):
        logits = streamer.logits(hidden, b).float()
        labels = streamer.batches[b].to(logits.device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   labels[:, 1:].reshape(-1), reduction="sum")
        total += float(losses)
        count += labels[:, 1:].numel()
    if streamer.world is not None:  # each rank scored its share of the rows
        from moekit.distributed import reduce_sums

        summed = reduce_sums({"total": total, "count": count}, streamer.world, "combining losses")
        total, count = summed["total"], int(summed["count"])
    return total / max(count, 1)
