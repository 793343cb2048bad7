"""How many experts of each layer `moekit.offload` keeps resident, and in what dtype.

Cache dtype. A checkpoint usually stores its experts in bf16 while CPU work computes in
fp32 (the development CPUs run bf16 matmuls 8-100x slower). A cache holding fp32 copies
spends twice the memory on values that have only bf16's bits, so by default (``"auto"``)
each fused parameter is cached in the dtype it is *stored* in, whenever the compute dtype
holds every value of it exactly (bf16 or fp16 into fp32), and upcast when a call computes
(`moekit.runtime.offloaded_experts`). The values computed with are then exactly those of
the fully loaded model, so its logits stay bit for bit the same. An explicit
``cache_dtype`` narrower than the stored dtype (an fp32 checkpoint cached in bf16, or fp16
in bf16 and back, each lacking bits the other has) rounds every expert: less memory,
outputs no longer equal to the fully loaded model's.

Budget. Upcasting needs room for the expert being computed in the compute dtype: a scratch
of two experts (`moekit.runtime.offloaded_experts`), shared by all layers since they run
one after another. It is taken from ``expert_memory`` first. Then every layer gets its
top-k slots (less is refused, naming the minimum), and the rest goes slot by slot to the
layer with the smallest resident fraction, or, with a prior, where a slot pins the most
calibration mass per byte (`allocate`). A share (``"25%"``) is of the routed experts' bytes
in the cache dtype, the scratch on top.
"""

from __future__ import annotations

import torch

from moekit.errors import MoekitError, setting


def cache_dtype_for(stored: torch.dtype, compute: torch.dtype, requested: torch.dtype | str = "auto") -> torch.dtype:
    """The dtype a parameter stored as ``stored`` is cached in (see the module docstring)."""
    if requested != "auto":
        return requested
    if stored.is_floating_point and torch.promote_types(stored, compute) == compute:
        return stored
    return compute


def parse_cache_dtype(value: torch.dtype | str | None) -> torch.dtype | str:
    """``"auto"``/None, a torch floating dtype, or its name (``"bfloat16"``, ``"float32"``)."""
    if value is None or value == "auto":
        return "auto"
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MoekitError(f"{setting('cache_dtype', value)} is not a floating-point dtype; use auto, bfloat16, "
                          "float16 or float32.")
    return dtype


def budget_bytes(expert_memory: int | str, total: int, scratch: int = 0) -> int:
    """``expert_memory`` in bytes: a size (``"2GB"``, an int), or a share (``"25%"``) of
    ``total``, the routed experts' bytes in their cache dtypes, with the ``scratch`` on top
    (so ``"100%"`` keeps every expert resident)."""
    from moekit.devices import parse_bytes

    if isinstance(expert_memory, str) and expert_memory.strip().endswith("%"):
        try:
            share = float(expert_memory.strip()[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:  # the message names no setting: the CLI checks it while parsing --expert-memory
            raise MoekitError(f"{expert_memory!r} is not a share of the routed experts in (0%, 100%]; write e.g. 25%.")
        return int(total * share) + scratch
    return parse_bytes(expert_memory)


def allocate(budget: int, num_experts: dict[int, int], top_k: dict[int, int], sizes: dict[int, int],
             prior: dict[int, list[float]] | None = None, *, scratch: int = 0, detail: str = "") -> dict[int, int]:
    """Slots per layer for ``budget`` bytes, ``scratch`` of them set aside (see the module
    docstring). With a ``prior`` (per-layer expert scores) each slot past top-k goes where it
    pins the most of its layer's score mass per byte — the next-best expert's share — so a
    layer whose routing is concentrated on a few experts gets fewer slots than one spread
    over many.

    Raises:
        MoekitError: ``budget`` below ``scratch`` + Σ_l top_k_l × bytes per expert_l (the
            message states that minimum; ``detail`` says in what dtype).
    """
    capacity = {i: min(top_k[i], num_experts[i]) for i in num_experts}
    minimum = sum(capacity[i] * sizes[i] for i in capacity) + scratch
    if budget < minimum:
        extra = f", plus {_human(scratch)} to compute from" if scratch else ""
        raise MoekitError(f"{setting('expert_memory')} ({budget:,} bytes) is less than every MoE layer's top-k "
                          f"experts need at once: the minimum is {minimum:,} bytes ({_human(minimum)}: the top-k experts "
                          f"of each of {len(capacity)} layers, {sum(capacity.values())} experts of {_human(max(sizes.values()))}"
                          f"{detail}{extra}).")
    left = budget - minimum
    if prior is not None:  # each layer's scores as shares of its mass, best first
        ranked = {i: sorted((max(p, 0.0) / (sum(max(q, 0.0) for q in prior[i]) or 1.0) for p in prior[i]),
                            reverse=True) for i in capacity}
    while True:
        open_layers = [i for i in capacity if capacity[i] < num_experts[i] and sizes[i] <= left]
        if not open_layers:
            return capacity
        if prior is not None:
            i = max(open_layers, key=lambda j: (ranked[j][capacity[j]] / sizes[j], -j))
        else:
            i = min(open_layers, key=lambda j: (capacity[j] / num_experts[j], j))
        capacity[i] += 1
        left -= sizes[i]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
