"""Routing counts of one MoE layer, accumulated batch by batch while the layer streams.

`Rows` describes the analysed tokens once (which corpus each batch comes from, which
rows fit the token lookup and which test it, the compact token-id index); a
`LayerCounts` sees every batch's MoE-block input through `moekit.calib.runner.watching`,
routes it with the canonical router (`moekit.calib.observers.BatchContext`) and adds to
its sums. What crosses from one MoE layer to the next (`Carry`) is each token's
selections and the block inputs of the first ``prefetch_tokens`` tokens, so that the
next layer can measure how its choice depends on this one's — memory T·k integers plus
prefetch_tokens·H floats, never a second layer's weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moekit.analyze import statistics as st
from moekit.arch.layer import MoELayer
from moekit.calib.observers import BatchContext

TOP_TOKENS_PER_EXPERT = 5
FREQUENT_TOKENS = 20
SPECIFIC_Z = 1.96  # an expert is "specific" to a corpus above this log-odds z
MIN_TOKEN_COUNT = 5  # a token id seen fewer times says nothing about its routing


@dataclass
class Rows:
    """The analysed token rows, cut into batches that each hold rows of one corpus.

    Attributes:
        batches: [B_b, S] token ids per batch.
        corpus: the corpus index of each batch; ``corpora`` their names.
        fit: [B_b] bool per batch: rows whose routing fits the token-id lookup (even
            rows of each corpus); the others (odd rows) test it.
        position_buckets: positions 0..S-1 cut into this many equal buckets.
        prefetch_tokens: at most this many tokens, every m-th of all rows' tokens in
            order (m = ⌈T / prefetch_tokens⌉, so every corpus is represented), are those
            the one-step predictor is measured on.
    """

    batches: list[torch.Tensor]
    corpus: list[int]
    corpora: list[str]
    fit: list[torch.Tensor]
    position_buckets: int = 8
    prefetch_tokens: int = 16384

    def __post_init__(self) -> None:
        ids = torch.cat([b.reshape(-1) for b in self.batches])
        self.vocab, inverse, frequency = ids.unique(return_inverse=True, return_counts=True)
        self.compact = [part.view(b.shape) for part, b in zip(inverse.split([b.numel() for b in self.batches]),
                                                                 self.batches)]
        self.frequency = frequency
        self.frequent = frequency.argsort(descending=True, stable=True)[:FREQUENT_TOKENS]  # compact indices
        self.offsets = [0]
        for b in self.batches:
            self.offsets.append(self.offsets[-1] + b.numel())
        self.seq_len = self.batches[0].shape[1]
        stride = -(-self.tokens // self.prefetch_tokens)
        self.prefetch = torch.arange(self.tokens) % stride == 0  # [T] the tokens the predictor is scored on
        kept = torch.cat([torch.zeros(1, dtype=torch.long), self.prefetch.long().cumsum(0)])
        self.prefetch_offsets = [int(kept[o]) for o in self.offsets]  # kept tokens before each batch

    @property
    def tokens(self) -> int:
        return self.offsets[-1]


@dataclass
class Carry:
    """What MoE layer l hands to the next: its index, E, k, each token's selections
    [T, k], and the block inputs [n, H] of the n tokens of `Rows.prefetch`."""

    index: int
    num_experts: int
    selections: torch.Tensor
    hidden: torch.Tensor


class LayerCounts:
    """Sums over the tokens of one MoE layer; `finish` turns them into statistics."""

    def __init__(self, view: MoELayer, rows: Rows, previous: Carry | None) -> None:
        E, k = view.num_experts, view.top_k
        self.view, self.rows, self.previous = view, rows, previous
        f64 = dict(dtype=torch.float64)
        self.count = torch.zeros(E, **f64)
        self.gate = torch.zeros(E, **f64)
        self.entropy = 0.0
        self.coactivation = torch.zeros(E, E, **f64)
        U = rows.vocab.numel()
        self.token_fit = torch.zeros(U * E, **f64)
        self.token_test = torch.zeros(U * E, **f64)
        self.position = torch.zeros(rows.position_buckets, E, **f64)
        self.domain = torch.zeros(len(rows.corpora), E, **f64)
        self.joint = None if previous is None else torch.zeros(previous.num_experts, E, **f64)
        self.joint_top1 = None if previous is None else torch.zeros(previous.num_experts, E, **f64)
        self.hits, self.predicted = 0.0, 0
        self.selections = torch.zeros(rows.tokens, k, dtype=torch.int32)
        self.hidden: list[torch.Tensor] = []
        self._batch = 0

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """While open, each call of the layer's MoE block adds its batch (in batch order)."""
        from moekit.arch.layer import watching

        self._batch = 0
        with watching(self.view.block, self._see):
            yield

    @torch.no_grad()
    def _see(self, x: torch.Tensor) -> None:
        b = self._batch
        self._batch += 1
        rows, E, k = self.rows, self.view.num_experts, self.view.top_k
        hidden = x.reshape(-1, x.shape[-1])
        T = hidden.shape[0]
        start = rows.offsets[b]
        if T != rows.batches[b].numel():
            raise RuntimeError(f"MoE block of layer {self.view.index} saw {T} tokens for batch {b} "
                               f"of {rows.batches[b].numel()}")
        ctx = BatchContext(self.view, hidden)
        index, weights = ctx.routing
        index = index.cpu()
        chosen = torch.zeros(T, E, dtype=torch.float64).scatter_(1, index, 1.0)
        flat = index.reshape(-1)
        self.count += chosen.sum(0)
        self.gate.index_add_(0, flat, weights.reshape(-1).double().cpu())
        p = ctx.probabilities.double()
        p = p / p.sum(-1, keepdim=True)
        self.entropy += float(-(p * p.clamp(min=1e-300).log()).sum())
        self.coactivation += chosen.T @ chosen
        # token ids: fit rows and test rows
        compact = rows.compact[b]  # [B, S]
        fit = rows.fit[b][:, None].expand_as(compact).reshape(-1)
        keys = (compact.reshape(-1, 1) * E + index).reshape(-1)
        per_slot_fit = fit[:, None].expand(T, k).reshape(-1)
        self.token_fit += torch.bincount(keys[per_slot_fit], minlength=self.token_fit.numel()).double()
        self.token_test += torch.bincount(keys[~per_slot_fit], minlength=self.token_test.numel()).double()
        # position buckets
        S = rows.seq_len
        bucket = (torch.arange(S) * rows.position_buckets // S).repeat(compact.shape[0])
        self.position.index_add_(0, bucket, chosen)
        self.domain[rows.corpus[b]] += chosen.sum(0)
        # the previous MoE layer: joint selections, and the one-step predictor
        if self.previous is not None:
            before = self.previous.selections[start:start + T].long()
            prev_chosen = torch.zeros(T, self.previous.num_experts, dtype=torch.float64).scatter_(1, before, 1.0)
            self.joint += prev_chosen.T @ chosen
            self.joint_top1.view(-1).index_add_(0, before[:, 0] * E + index[:, 0],
                                                torch.ones(T, dtype=torch.float64))
            scored = rows.prefetch[start:start + T]
            n = int(scored.sum())
            if n:
                h = self.previous.hidden[rows.prefetch_offsets[b]:rows.prefetch_offsets[b + 1]].to(device=hidden.device)
                guess, _ = self.view.router.route(self.view.router.logits(h))
                hit = torch.zeros(n, E, dtype=torch.float64).scatter_(1, guess.cpu(), 1.0) * chosen[scored]
                self.hits += float(hit.sum())
                self.predicted += n
        self.selections[start:start + T] = index.to(torch.int32)
        keep = rows.prefetch[start:start + T].to(hidden.device)
        if bool(keep.any()):
            self.hidden.append(hidden[keep].float().cpu())

    def carry(self) -> Carry:
        hidden = torch.cat(self.hidden) if self.hidden else torch.zeros(0, self.view.experts.hidden_size)
        return Carry(self.view.index, self.view.num_experts, self.selections, hidden)

    def finish(self, decode=None) -> dict:
        """Every statistic of the layer (see `moekit.analyze.statistics`) as plain numbers."""
        rows, view = self.rows, self.view
        E, k, T = view.num_experts, view.top_k, rows.tokens
        out: dict = {"layer": view.index, "num_experts": E, "top_k": k}
        out["load"] = st.load_summary(self.count, self.gate, self.entropy, T)
        lift = st.coactivation_lift(self.coactivation, T)
        out["coactivation"] = {  # lift: `statistics.coactivation_lift` of the counts (not stored: E² more numbers)
            "counts": self.coactivation.long().tolist(),
            "order": st.cluster_order(lift),
            "top_pairs": st.top_pairs(self.coactivation, T),
        }
        if self.previous is not None:
            mi = st.mutual_information(self.joint)
            mi_top1 = st.mutual_information(self.joint_top1)
            out["from_previous"] = {
                "previous_layer": self.previous.index,
                "joint": self.joint.long().tolist(),  # the transition matrix: `statistics.transition_matrix`
                "mutual_information_bits": mi["bits"],
                "mutual_information_normalized": mi["normalized"],
                "joint_top1": self.joint_top1.long().tolist(),
                "mutual_information_top1_bits": mi_top1["bits"],
                "mutual_information_top1_normalized": mi_top1["normalized"],
                "prefetch_tokens": self.predicted,
                "prefetch_recall": self.hits / (k * self.predicted) if self.predicted else None,
                "static_recall": st.static_recall(self.count, k),
            }
        out["tokens"] = self._tokens(decode)
        divergence = st.position_divergence(self.position)
        out["position"] = {"buckets": rows.position_buckets, "seq_len": rows.seq_len,
                           "counts": self.position.long().tolist(), "divergence": divergence.tolist(),
                           "max_divergence": float(divergence.max())}
        out["domains"] = self._domains()
        return out

    def _tokens(self, decode) -> dict:
        rows, E, k = self.rows, self.view.num_experts, self.view.top_k
        fit = self.token_fit.view(-1, E)
        test = self.token_test.view(-1, E)
        both = fit + test
        concentration, entropy = st.token_concentration(both, k)
        frequent = rows.frequency >= MIN_TOKEN_COUNT
        weights = rows.frequency.double() * frequent
        mean_conc = float((concentration * weights).sum() / weights.sum()) if weights.sum() > 0 else None

        def token(u: int) -> dict:
            tid = int(rows.vocab[u])
            return {"id": tid, "text": decode(tid) if decode else None}

        share = both / rows.frequency.double()[:, None].clamp(min=1)  # of v's occurrences, the share routed to j
        # per expert: ids seen >= MIN_TOKEN_COUNT times by that share, ties to the more frequent
        order = both.argsort(dim=0, descending=True, stable=True)  # [U, E]
        ranked = torch.where(frequent[order], share.gather(0, order), torch.full_like(share, -1.0))
        best = ranked.argsort(dim=0, descending=True, stable=True)[:TOP_TOKENS_PER_EXPERT]  # [n, E]
        picked = order.gather(0, best)
        ids, values = picked.T.tolist(), ranked.gather(0, best).T.tolist()
        counts = both.gather(0, picked).long().T.tolist()
        per_expert = [[{**token(u), "share": v, "count": c} for u, v, c in zip(ids[j], values[j], counts[j]) if v > 0]
                      for j in range(E)]
        return {
            "lookup_agreement": st.token_lookup_agreement(fit, test, k),
            "static_agreement": st.static_recall(test.sum(0), k) if test.sum() > 0 else 0.0,
            "mean_concentration": mean_conc,
            "uniform_concentration": k / E,
            "frequent": [{**token(int(u)), "occurrences": int(rows.frequency[u]),
                          "concentration": float(concentration[u]), "entropy": float(entropy[u]),
                          "experts": both[u].topk(k).indices.tolist()} for u in rows.frequent],
            "per_expert": per_expert,
        }

    def _domains(self) -> dict:
        rows = self.rows
        counts = self.domain
        out = {"corpora": rows.corpora, "counts": counts.long().tolist(),
               "share": (counts / counts.sum(1, keepdim=True).clamp(min=1)).tolist()}
        if len(rows.corpora) > 1:
            z = st.log_odds_z(counts)
            out["z"] = z.tolist()
            out["specific_count"] = {name: int((z[d] > SPECIFIC_Z).sum()) for d, name in enumerate(rows.corpora)}
            out["specific"] = {
                name: [{"expert": int(j), "z": float(z[d, j]), "share": float(counts[d, j] / counts[d].sum())}
                       for j in z[d].argsort(descending=True)[:5].tolist() if z[d, j] > SPECIFIC_Z]
                for d, name in enumerate(rows.corpora)
            }
        return out
