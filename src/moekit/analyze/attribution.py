"""Expert attribution: how much a corpus's loss depends on one expert.

For an expert j of MoE layer l, the attribution on a corpus is ``loss(j masked) −
loss``: the increase of the mean next-token cross-entropy (nats) over every predicted
position of the corpus's rows when j is taken out of layer l's routing — never chosen
and absent from every normalisation, exactly as if `moekit.keep_experts` had removed it
(`moekit.arch.routing.route` with ``allowed``) — everything else unchanged. With
group-limited routing (DeepSeek, GLM) the expert's group keeps competing with its other
experts, which `keep_experts` cannot express (it keeps the same number per group).

Measuring it costs a forward of the rows from layer l on, so it is measured for the
top candidates only, ranked by their share of the layer's gate mass on the corpus
(relative to a fair share, share·E). One streamed pass over the corpus's rows carries
the unmasked hidden states and one copy per candidate, started at the candidate's
layer: memory (candidates + 1) × the rows' hidden states, plus one layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from moekit.arch.layer import MoELayer


@contextlib.contextmanager
def masked(view: MoELayer, expert: int) -> Iterator[None]:
    """While open, the MoE block of ``view`` computes its output as if ``expert`` were
    removed: the block's output is replaced by the canonical forward (`MoELayer.forward`,
    tested equal to every family's own block) with that expert disallowed."""
    allowed = torch.ones(view.num_experts, dtype=torch.bool)
    allowed[expert] = False

    def replace(_module, args, output):
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        out, *_ = view.forward(flat, allowed.to(flat.device))
        out = out.reshape(x.shape).to(x.dtype)
        if isinstance(output, tuple):
            return (out, *output[1:])
        return out

    handle = view.block.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def candidates(layers: list[dict], corpus: int, n: int) -> list[tuple[int, int]]:
    """(layer, expert) of the ``n`` experts with the largest gate-mass share·E on corpus
    ``corpus`` (selections counted by `moekit.analyze.collect`), over all MoE layers."""
    scored = []
    for layer in layers:
        counts = torch.tensor(layer["domains"]["counts"][corpus], dtype=torch.float64)
        share = counts / counts.sum().clamp(min=1)
        for j, s in enumerate(share.tolist()):
            scored.append((s * layer["num_experts"], layer["layer"], j))
    scored.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(layer, j) for _, layer, j in scored[:n]]


@torch.no_grad()
def attribute(lent, input_ids: torch.Tensor, chosen: list[tuple[int, int]], *, batch_size: int = 8,
              progress=None) -> dict:
    """The loss of ``input_ids`` [N, S] and, for each (layer, expert) in ``chosen``, the
    loss with that expert masked (see the module docstring), in one streamed pass.
    ``progress(status)`` is called after each decoder layer and after each loss scored
    (the head over every row: 1 + len(chosen) of them, as long as the layers together)."""
    from moekit.arch.discover import view_layer
    from moekit.calib.runner import LayerStreamer

    streamer = LayerStreamer(lent, input_ids, batch_size=batch_size)
    hidden = streamer.capture("attribution")
    forks: dict[tuple[int, int], list[torch.Tensor]] = {}
    for index, layer in streamer.layers():
        for fork in forks.values():
            streamer.forward(index, layer, fork)
        here = [c for c in chosen if c[0] == index]
        if here:
            view = view_layer(lent.model, index)
            for key in here:
                fork = [hidden[b].clone() for b in range(len(hidden))]
                with masked(view, key[1]):
                    streamer.forward(index, layer, fork)
                forks[key] = fork
        streamer.forward(index, layer, hidden)
        if progress is not None:
            progress(f"layer {index + 1}/{len(lent)}")

    def loss(states) -> float:
        total, count = 0.0, 0
        for b, ids in enumerate(streamer.batches):
            logits = streamer.logits(states, b).float()
            targets = ids[:, 1:].to(logits.device)
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            count += targets.numel()
        return total / count

    base = loss(hidden)
    if progress is not None:
        progress("loss scored unmasked")
    measured = []
    for (index, expert), fork in forks.items():
        masked_loss = loss(fork)
        if progress is not None:
            progress(f"loss scored without expert {expert} of layer {index}")
        measured.append({"layer": index, "expert": expert, "loss": masked_loss, "increase": masked_loss - base})
    measured.sort(key=lambda m: -m["increase"])
    return {"loss": base, "tokens": int(input_ids[:, 1:].numel()), "experts": measured}
