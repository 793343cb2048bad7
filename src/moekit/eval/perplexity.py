"""Token-weighted perplexity and next-token accuracy with a fixed context and stride,
plus how each MoE layer routes the evaluated tokens.

Windows of ``context_length`` tokens advance by ``stride`` tokens; each window scores
only its last ``stride`` tokens (the first window scores all of its own), so every token
after the first is predicted exactly once with at least ``context_length - stride`` tokens
of left context — the sliding-window evaluation of the transformers perplexity guide.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from moekit.errors import MoekitError, setting
from moekit.progress import progress_bar


@dataclass
class LayerRouting:
    """How one MoE layer routed the scored tokens.

    ``entropy``: mean over tokens of the entropy (nats) of the router distribution;
    ``entropy_normalized``: the same divided by log E (1 = uniform);
    ``load_imbalance``: max over experts of top-k selections / their mean (1 = balanced);
    ``experts_per_token``: experts computed per token, after any routing policy (top-k
    without one).
    """

    index: int
    entropy: float
    entropy_normalized: float
    load_imbalance: float
    load: list[int] = field(default_factory=list)
    experts_per_token: float = 0.0


@dataclass
class EvalResult:
    perplexity: float
    nll: float
    accuracy: float
    tokens: int
    context_length: int
    stride: int
    layers: list[LayerRouting]
    experts_per_token: float | None = None  # mean over MoE layers; None without routing statistics

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def loss(self) -> float:
        """Mean next-token cross-entropy in nats (the same as ``nll``)."""
        return self.nll

    @property
    def load(self) -> dict[int, list[float]]:
        """{layer: each expert's share of the layer's top-k selections}."""
        return {l.index: [n / max(sum(l.load), 1) for n in l.load] for l in self.layers}

    def min_load_ratio(self) -> float:
        """min over layers and experts of share · E: 1 when balanced, 0 for a dead expert
        (1 for a dense model: no expert can starve)."""
        return min((min(v) * len(v) for v in self.load.values()), default=1.0)

    def max_load_ratio(self) -> float:
        return max((max(v) * len(v) for v in self.load.values()), default=1.0)


def windows(length: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of ``length``.

    The first window scores positions 1..end-1; each later window ends ``stride`` tokens
    after the previous one and scores just those, with ``context_length - stride`` or
    more tokens of left context. Every position after the first is scored exactly once.
    """
    end = min(context_length, length)
    out = [(0, end, 1)]
    while end < length:
        new_end = min(end + stride, length)
        out.append((max(0, new_end - context_length), new_end, end))
        end = new_end
    return out


class _RoutingRecorder:
    """Accumulates router entropy and expert loads of scored tokens, per MoE layer, as the
    layers stream by (``masks[b]``: [B, S] scored positions of batch b)."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        self.masks = masks
        self.tokens = sum(int(m.sum()) for m in masks)
        self.layers: list = []
        self.entropy: dict[int, float] = {}
        self.load: dict[int, torch.Tensor] = {}
        self.kept: dict[int, int] = {}
        self.policy = None  # the model's routing policy, set by `evaluate`

    @contextlib.contextmanager
    def attached(self, layer) -> Iterator[None]:
        """While open, layer ``layer`` (a `MoELayer` view) records each batch it routes."""
        from moekit.arch.layer import watching

        self.layers.append(layer)
        self.entropy[layer.index] = 0.0
        self.load[layer.index] = torch.zeros(layer.num_experts, dtype=torch.long)
        self.kept[layer.index] = 0
        batch = iter(range(len(self.masks)))

        def see(x):
            mask = self.masks[next(batch)].to(x.device)
            hidden = x.reshape(-1, x.shape[-1])[mask.reshape(-1)]
            logits = layer.router.logits(hidden)
            probs = layer.router.probabilities(logits)
            probs = probs / probs.sum(-1, keepdim=True)  # sigmoid scores -> a distribution
            self.entropy[layer.index] += float(-(probs * probs.clamp(min=1e-30).log()).sum())
            index, weights = layer.router.route(logits)
            if self.policy is not None:  # what the experts really compute: the kept slots
                keep = self.policy.keep(weights, layer.index)
                index = index[keep]
            self.load[layer.index] += torch.bincount(index.flatten().cpu(), minlength=layer.num_experts)
            self.kept[layer.index] += index.numel()

        with watching(layer.block, see):
            yield

    def summary(self) -> list[LayerRouting]:
        out = []
        for layer in self.layers:
            load = self.load[layer.index]
            mean_load = load.float().mean().item()
            entropy = self.entropy[layer.index] / max(self.tokens, 1)
            out.append(
                LayerRouting(
                    index=layer.index,
                    entropy=entropy,
                    entropy_normalized=entropy / math.log(layer.num_experts),
                    load_imbalance=load.max().item() / mean_load if mean_load > 0 else 0.0,
                    load=load.tolist(),
                    experts_per_token=self.kept[layer.index] / max(self.tokens, 1),
                )
            )
        return out


def check_scoring(config, tokens: torch.Tensor, *, context_length: int | None = None,
                  stride: int | None = None) -> tuple[int, int]:
    """Check, from a model's config alone, that `evaluate` can score ``tokens`` [L] or [N, S]
    with it; returns the (context_length, stride) it will use. Cheap: callers comparing
    several models run it for all of them before scoring any.

    Raises:
        MoekitError: windows longer than the model's positions, a stride outside
            1..context_length-1, sequences under 2 tokens, or token ids outside the
            model's vocabulary (the data was tokenized for another model).
    """
    max_positions = getattr(config, "max_position_embeddings", None) or 512
    context_length = context_length or min(512, max_positions)
    stride = stride or max(context_length // 2, 1)
    if context_length > max_positions:
        raise MoekitError(f"{setting('context_length', context_length)} is beyond the model's {max_positions} "
                          f"positions; use at most {max_positions}.")
    if not 0 < stride < context_length:
        raise MoekitError(
            f"{setting('stride', stride)} must be in 1..{context_length - 1} (below {setting('context_length')}, so "
            "that each window keeps left context)."
        )
    if tokens.numel() < 2 or tokens.shape[-1] < 2:
        raise MoekitError("evaluation needs at least 2 tokens per sequence; the data is too short.")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and int(tokens.max()) >= vocab:
        raise MoekitError(f"token id {int(tokens.max())} is outside the model's vocabulary of {vocab}: the data "
                          "was tokenized for another model; evaluate with this model's own tokenizer.")
    return context_length, stride


def spread(jobs: list, max_tokens: int) -> list:
    """At most ``max_tokens`` scored tokens' worth of ``jobs`` ((stream, window) pairs in
    stream order), spread evenly over all of them: a bounded evaluation that estimates the
    whole one (the first tokens of a corpus are often one unrepresentative file — the
    stdlib split opens with codec tables). Each chosen window scores exactly the tokens it
    scores in the whole evaluation, and they are the windows that score ``stride`` tokens
    with the full left context (not a stream's first window, which scores its short-context
    opening, nor a short last one), unless there are none. All of them when they fit."""
    def scored(job) -> int:
        _, (_, end, first) = job
        return end - first

    if sum(scored(job) for job in jobs) <= max_tokens:
        return jobs
    later = [job for job in jobs if job[1][2] != 1]
    width = max((scored(job) for job in later), default=0)
    full = [job for job in later if scored(job) == width] or jobs
    width = max(scored(job) for job in full)
    count = max(1, min(len(full), max_tokens // width))
    return [full[i] for i in torch.linspace(0, len(full) - 1, count).round().long().tolist()]


def _window_batches(tokens: torch.Tensor, context_length: int, stride: int, batch_size: int,
                    max_tokens: int | None = None):
    """Batches of windows: ids, the positions fed to the model, the positions whose next
    token is scored (each [B, width], width = the batch's longest window); with
    ``max_tokens``, only the windows `spread` chooses."""
    streams = [tokens] if tokens.ndim == 1 else list(tokens)
    jobs = [(s, w) for s in streams for w in windows(len(s), context_length, stride)]
    if max_tokens is not None:
        jobs = spread(jobs, max_tokens)
    ids_list, masks, scored_list = [], [], []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        width = max(end - begin for _, (begin, end, _) in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        scored = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, (stream, (begin, end, first)) in enumerate(batch):
            ids[row, : end - begin] = stream[begin:end]
            mask[row, : end - begin] = True
            scored[row, first - begin - 1 : end - begin - 1] = True
        ids_list.append(ids)
        masks.append(mask)
        scored_list.append(scored)
    return ids_list, masks, scored_list


@torch.no_grad()
def evaluate(
    model,
    tokens: torch.Tensor,
    *,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    routing: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
    activations=None,
    shard: bool = True,
) -> EvalResult:
    """Perplexity, next-token accuracy and per-layer routing on a token stream.

    The windows are pushed through the model one decoder layer at a time (the loop of
    calibration, `moekit.calib.runner`), then through its final norm and head, so a model
    read from a checkpoint (`moekit.io.layered.LayeredModel`) needs one layer's weights at
    a time plus the hidden states of all windows (spilled to files above the
    ``activations`` budget).

    Args:
        model: a causal LM in memory (routing statistics need a supported MoE family), or
            a `LayeredModel`.
        tokens: [L] one token stream, or [N, S] independent sequences (each its own stream).
        context_length: tokens per window (default: min(512, the model's positions)).
        stride: new tokens scored per window, < context_length (default: context_length // 2).
        max_tokens: score at most this many tokens, in windows spread evenly over the whole
            stream (`spread`), each scored as in the whole evaluation: an estimate of it
            (None: every token).
        routing: also measure router entropy and load imbalance per MoE layer.
        device: where a model in memory computes (a `LayeredModel` has its own).
        activations: an `ActivationBudget` (default: hidden states in memory).
        shard: in a torch.distributed run (`moekit.distributed`), each rank scores its
            share of the windows and the sums of token losses, hits and counts (and the
            routing statistics) are combined: the result is the one-process result.
    """
    from moekit.arch.discover import view_layer
    from moekit.calib.runner import LayerStreamer
    from moekit.io.layered import LayeredModel

    lent = model if isinstance(model, LayeredModel) else LayeredModel.in_memory(model, device=device)
    context_length, stride = check_scoring(lent.model.config, tokens, context_length=context_length, stride=stride)
    ids, masks, scored = _window_batches(tokens, context_length, stride, batch_size, max_tokens)
    streamer = LayerStreamer(lent, ids, attention_mask=masks, budget=activations, shard=shard)
    ids, scored = ids[streamer.mine.start: streamer.mine.stop], scored[streamer.mine.start: streamer.mine.stop]
    if streamer.world is not None:  # ranks given other inputs would add up unrelated losses
        from moekit.calib.stats import agree_streamed

        agree_streamed(lent, tokens, {"settings": [context_length, stride, batch_size, routing, max_tokens]},
                       streamer.world, "evaluation")
    recorder = _RoutingRecorder(scored) if routing and lent.family is not None else None  # dense: no routing
    if recorder is not None:
        from moekit.methods.dynamic.install import routing_policy

        recorder.policy = routing_policy(lent.model)
    n_layers, n_batches = len(lent), len(ids)
    nll, correct, count = 0.0, 0, 0
    with progress_bar("evaluating", total=(n_layers + 1) * n_batches, unit="batch", enabled=progress) as advance:
        hidden = streamer.capture()
        for index, layer in streamer.layers():
            view = view_layer(lent.model, index) if recorder is not None else None
            status = f"layer {index + 1}/{n_layers}"
            streamer.forward(index, layer, hidden, observe=recorder.attached(view) if view is not None else None,
                             on_batch=lambda b: advance(1, status))
        for b in range(n_batches):
            logits = streamer.logits(hidden, b).float()
            targets = ids[b].roll(-1, dims=1).to(logits.device)
            log_probs = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            keep = scored[b].to(logits.device)
            nll -= float(log_probs[keep].sum())
            correct += int((logits.argmax(-1) == targets)[keep].sum())
            count += int(keep.sum())
            advance(1, "head")
    if streamer.world is not None:
        nll, correct, count = _combine(streamer.world, nll, correct, count, recorder)
    mean_nll = nll / count
    return EvalResult(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        accuracy=correct / count,
        tokens=count,
        context_length=context_length,
        stride=stride,
        layers=(layers := recorder.summary() if recorder else []),
        experts_per_token=sum(l.experts_per_token for l in layers) / len(layers) if layers else None,
    )


def _combine(world, nll: float, correct: int, count: int, recorder: _RoutingRecorder | None) -> tuple[float, int, int]:
    """Sums of every rank's token losses, hits and counts (exact: counts are integers,
    losses float64 sums), and of the routing recorder's entropies and loads."""
    from moekit.distributed import all_sum, reduce_sums

    values = {"nll": nll, "correct": correct, "count": count}
    if recorder is not None:
        values["tokens"] = recorder.tokens
        values.update({f"entropy.{i}": e for i, e in recorder.entropy.items()})
        values.update({f"kept.{i}": k for i, k in recorder.kept.items()})
    total = reduce_sums(values, world, "combining evaluation sums")
    if recorder is not None:
        recorder.tokens = int(total["tokens"])
        recorder.entropy = {i: total[f"entropy.{i}"] for i in recorder.entropy}
        recorder.kept = {i: int(total[f"kept.{i}"]) for i in recorder.kept}
        recorder.load = {i: all_sum(load, world, "combining expert loads") for i, load in recorder.load.items()}
    return total["nll"], int(total["correct"]), int(total["count"])
