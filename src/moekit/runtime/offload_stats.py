"""Counters of an offloaded run: cache hits and misses, bytes moved, prefetch quality.

One `OffloadStats` is shared by every offloaded layer of a model (``model.moekit_offload``
holds it). A *hit* is an expert a call needed that was resident; a *miss* is one that had
to be loaded before the call could compute, or was computed where its weights are
(`moekit.runtime.miss_compute`; those are counted in ``in_place`` too, and only the rows they
were sent, there and back, in ``activation_bytes``). Bytes moved are the bytes written into the
fast tier (the cache, in its compute dtype), by demand loads and by prefetch loads alike,
so "bytes moved per token" is the traffic the slow tier has to serve. Tokens are counted
at the first offloaded layer (each token passes every layer once).

Prefetch quality, over all layers and calls: precision = guessed experts that the next
call needed / experts guessed; recall = needed experts that had been guessed / experts
needed (only calls that had a guess count).

``trace`` records every cache request as `moekit.runtime.expert_cache.simulate` replays it,
and ``evictions`` every eviction, so a run can be checked against (or re-costed by) the
simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OffloadStats:
    hits: dict[int, int] = field(default_factory=dict)
    misses: dict[int, int] = field(default_factory=dict)
    bytes_moved: int = 0
    warm_bytes: int = 0  # loaded before the first token (the prior policy's pinned experts)
    tokens: int = 0
    prefetch_loads: int = 0
    in_place: dict[int, int] = field(default_factory=dict)  # misses computed where the weights are
    activation_bytes: int = 0  # rows sent to those experts and back (`moekit.runtime.miss_compute`)
    predicted: int = 0
    predicted_used: int = 0
    needed_with_guess: int = 0
    needed_guessed: int = 0
    trace: list[tuple[str, int, list[int]]] = field(default_factory=list)
    evictions: list[tuple[int, int]] = field(default_factory=list)
    record_trace: bool = True

    def add(self, mapping: dict[int, int], layer: int, n: int) -> None:
        mapping[layer] = mapping.get(layer, 0) + n

    def score_guess(self, guess: set[int], needed: set[int]) -> None:
        """One call's needed experts against the guess made for it."""
        self.predicted += len(guess)
        self.predicted_used += len(guess & needed)
        self.needed_with_guess += len(needed)
        self.needed_guessed += len(guess & needed)

    # -- summaries --------------------------------------------------------------------
    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    @property
    def total_misses(self) -> int:
        return sum(self.misses.values())

    @property
    def hit_rate(self) -> float:
        n = self.total_hits + self.total_misses
        return self.total_hits / n if n else float("nan")

    @property
    def misses_per_token(self) -> float:
        return self.total_misses / self.tokens if self.tokens else float("nan")

    @property
    def bytes_moved_per_token(self) -> float:
        return self.bytes_moved / self.tokens if self.tokens else float("nan")

    @property
    def prefetch_precision(self) -> float | None:
        return self.predicted_used / self.predicted if self.predicted else None

    @property
    def prefetch_recall(self) -> float | None:
        return self.needed_guessed / self.needed_with_guess if self.needed_with_guess else None

    def reset(self) -> None:
        """Zero the counters (the cache keeps its contents), e.g. between prefill and decode."""
        fresh = OffloadStats(record_trace=self.record_trace)
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "hits": self.total_hits, "misses": self.total_misses,
                "hit_rate": self.hit_rate, "misses_per_token": self.misses_per_token,
                "bytes_moved": self.bytes_moved, "bytes_moved_per_token": self.bytes_moved_per_token,
                "warm_bytes": self.warm_bytes, "prefetch_loads": self.prefetch_loads,
                "computed_in_place": sum(self.in_place.values()), "activation_bytes": self.activation_bytes,
                "prefetch_precision": self.prefetch_precision, "prefetch_recall": self.prefetch_recall}
