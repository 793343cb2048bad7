"""Which experts of one MoE layer are resident, and which to evict: the cache policies.

Pure bookkeeping, no tensors: a `LayerCache` maps resident expert ids to slots of a fixed
number of slots (``capacity``); `request` makes a set of experts resident and says which were
hits, which were loaded into which slot, and which were evicted to make room. The offloaded
runtime (`moekit.runtime.offload`) and the machine-independent benchmark both drive these
objects — the runtime by copying weights into the slots it is told, `simulate` by replaying
a recorded routing trace — so the evictions the runtime makes are, by construction and by
test, the simulated ones.

Policies (an eviction picks, among resident experts the current request does not need, the
one with the smallest key; ties fall to the least recently used, then the lowest id):

- ``lru``: last use (mixtral-offloading's baseline).
- ``lfu``: number of requests that needed the expert since the start (counts survive
  eviction, so an often-used expert that was pushed out comes back strong).
- ``prior``: a fixed score per expert (selection frequency or gate mass from calibration):
  the ``capacity - top_k`` best-scored experts are pinned (evicted only when a request
  needs more slots than the others offer, lowest score first); the remaining slots, at
  least a token's top-k, churn by LRU. The cache starts with the best-scored experts
  loaded (`warm`).

A request needing more experts than there are slots (a long prefill) is split by `plan`
into chunks of at most ``capacity`` experts, resident ones first, each chunk requested and
computed in turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

POLICIES = ("lru", "lfu", "prior")


@dataclass
class Step:
    """What one request did: experts found resident, ``(expert, slot)`` loaded, experts evicted."""

    hits: list[int]
    loads: list[tuple[int, int]]
    evictions: list[int]


class LayerCache:
    """Resident experts of one layer in ``capacity`` slots, evicted by ``policy``.

    Args:
        num_experts: E of the layer.
        capacity: slots (experts resident at once), 1..E.
        policy: one of `POLICIES`.
        prior: [E] scores (any floats, higher = keep), required by ``prior``.
        top_k: slots the ``prior`` policy leaves unpinned (the layer's top-k).
    """

    def __init__(self, num_experts: int, capacity: int, policy: str = "lru",
                 prior: Sequence[float] | None = None, top_k: int = 1) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
        if policy == "prior" and (prior is None or len(prior) != num_experts):
            raise ValueError(f"the prior policy needs one score per expert ({num_experts})")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity = min(capacity, num_experts)
        self.policy = policy
        self.prior = [float(p) for p in prior] if prior is not None else None
        self.slot_of: dict[int, int] = {}
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self._clock = 0
        self._last: dict[int, int] = {}
        self._uses: dict[int, int] = {}
        self.pinned: set[int] = set()
        if self.prior is not None and policy == "prior":
            best = sorted(range(num_experts), key=lambda e: (-self.prior[e], e))
            self.pinned = set(best[:max(self.capacity - top_k, 0)])

    # -- decisions --------------------------------------------------------------------
    def plan(self, needed: Iterable[int]) -> list[list[int]]:
        """``needed`` (expert ids) split into requests of at most ``capacity``: resident
        experts first (they cost nothing), then the others, each part sorted."""
        needed = sorted(set(needed))
        if not needed:
            return []
        resident = [e for e in needed if e in self.slot_of]
        missing = [e for e in needed if e not in self.slot_of]
        order = resident + missing
        return [sorted(order[i:i + self.capacity]) for i in range(0, len(order), self.capacity)]

    def request(self, experts: Sequence[int]) -> Step:
        """Make ``experts`` (at most ``capacity``, distinct) resident."""
        if len(experts) > self.capacity:
            raise ValueError(f"{len(experts)} experts requested at once from a cache of {self.capacity}; use plan()")
        self._clock += 1
        for e in experts:
            self._uses[e] = self._uses.get(e, 0) + 1
            self._last[e] = self._clock
        return self._bring(experts, protected=set(experts))

    def note(self, experts: Sequence[int]) -> None:
        """Count a use of ``experts`` without loading them (they were computed where they
        are: `moekit.runtime.miss_compute`)."""
        self._clock += 1
        for e in experts:
            self._uses[e] = self._uses.get(e, 0) + 1
            self._last[e] = self._clock

    def prefetch(self, experts: Sequence[int]) -> Step:
        """Load guessed ``experts`` ahead of their request (at most ``capacity`` are taken,
        in the order given). Guesses count as a use for LRU (they are about to be used) but
        not for LFU, whose counts are demand only."""
        experts = list(dict.fromkeys(experts))[:self.capacity]
        self._clock += 1
        for e in experts:
            self._last[e] = self._clock
        return self._bring(experts, protected=set(experts))

    def warm(self) -> Step:
        """Fill the slots with the best-scored experts (``prior`` policy; nothing otherwise)."""
        if self.prior is None or self.policy != "prior":
            return Step([], [], [])
        best = sorted(range(self.num_experts), key=lambda e: (-self.prior[e], e))[:self.capacity]
        return self._bring(sorted(best), protected=set(best))

    # -- mechanics --------------------------------------------------------------------
    def _bring(self, experts: Sequence[int], protected: set[int]) -> Step:
        hits, loads, evictions = [], [], []
        for e in experts:
            if e in self.slot_of:
                hits.append(e)
                continue
            if self._free:
                slot = self._free.pop()
            else:
                victim = self._victim(protected)
                evictions.append(victim)
                slot = self.slot_of.pop(victim)
            self.slot_of[e] = slot
            loads.append((e, slot))
        return Step(hits, loads, evictions)

    def _victim(self, protected: set[int]) -> int:
        candidates = [e for e in self.slot_of if e not in protected]
        if self.policy == "lru":
            return min(candidates, key=lambda e: (self._last.get(e, 0), e))
        if self.policy == "lfu":
            return min(candidates, key=lambda e: (self._uses.get(e, 0), self._last.get(e, 0), e))
        # unpinned first, by LRU; a pinned expert only when nothing else can go, lowest score first
        return min(candidates, key=lambda e: (e in self.pinned, self.prior[e] if e in self.pinned else 0.0,
                                              self._last.get(e, 0), e))


@dataclass
class SimResult:
    """Counts of a replayed trace, per layer: demand hits and misses (expert loads a request
    caused), prefetch loads, and every eviction as ``(layer, expert)`` in order."""

    hits: dict[int, int] = field(default_factory=dict)
    misses: dict[int, int] = field(default_factory=dict)
    prefetch_loads: dict[int, int] = field(default_factory=dict)
    warm_loads: dict[int, int] = field(default_factory=dict)
    evictions: list[tuple[int, int]] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        h, m = sum(self.hits.values()), sum(self.misses.values())
        return h / (h + m) if h + m else float("nan")


def simulate(trace: Iterable[tuple[str, int, Sequence[int]]], capacity: int | dict[int, int], policy: str,
             *, num_experts: int | dict[int, int], prior: dict[int, Sequence[float]] | None = None,
             top_k: int | dict[int, int] = 1) -> SimResult:
    """Replay ``trace`` on fresh caches.

    Args:
        trace: events ``("demand", layer, experts)`` — one experts call needing ``experts``
            (split by `LayerCache.plan` as the runtime splits it) — and ``("prefetch",
            layer, experts)``, in the order they happened. `OffloadStats.trace` records
            exactly this.
        capacity, num_experts, top_k: per layer (a dict) or the same for all.
        prior: per-layer scores for the ``prior`` policy.
    """
    caches: dict[int, LayerCache] = {}
    result = SimResult()

    def cache(layer: int) -> LayerCache:
        if layer not in caches:
            cap = capacity[layer] if isinstance(capacity, dict) else capacity
            e = num_experts[layer] if isinstance(num_experts, dict) else num_experts
            k = top_k[layer] if isinstance(top_k, dict) else top_k
            caches[layer] = LayerCache(e, cap, policy, prior[layer] if prior is not None else None, top_k=k)
            result.warm_loads[layer] = len(caches[layer].warm().loads)
        return caches[layer]

    for kind, layer, experts in trace:
        c = cache(layer)
        steps = [c.prefetch(list(experts))] if kind == "prefetch" else [c.request(p) for p in c.plan(experts)]
        for step in steps:
            result.evictions.extend((layer, e) for e in step.evictions)
            if kind == "prefetch":
                result.prefetch_loads[layer] = result.prefetch_loads.get(layer, 0) + len(step.loads)
            else:
                result.hits[layer] = result.hits.get(layer, 0) + len(step.hits)
                result.misses[layer] = result.misses.get(layer, 0) + len(step.loads)
    return result
