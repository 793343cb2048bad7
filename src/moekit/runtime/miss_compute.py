"""Computing a missed expert where its weights are (Fiddler) instead of loading it.

With a GPU device and the routed experts in CPU memory, an expert a call needs but the
cache lacks can be *loaded*: its weights copied into a cache slot (a Mixtral expert is
336 MB in bf16) and computed on the GPU; or *computed in place*: the rows routed to it
sent to the CPU (a few KB each), multiplied there by the slow tier's own copy, and the
output rows sent back. Fiddler (Kamahori et al., 2024) showed the second wins for a few
tokens and loses for many; where the line falls depends on the machine. `MissCost`
measures both on the running machine when a model is offloaded (`measure_miss_cost`) and
decides per missed expert from the ``n`` rows routed to it:

    in place  iff  cpu(n)  <  transfer + device(n)

cpu(n) (the rows' round trip included) and device(n) are fitted as ``a + b·n`` from timings
at 1 and `WIDE` rows; transfer is the copy of one expert into a slot. An expert
computed in place is not loaded, so the cache keeps what it holds (LFU still counts the
use). Modes (``compute_misses``): ``"never"`` loads every miss (the plain cache),
``"always"`` computes every miss in place, ``"auto"`` asks the cost model.

Only a slow tier in CPU memory can compute (`moekit.runtime.expert_store.MemoryExperts`).
On a CPU device the cache and the slow tier are both CPU memory, so in place saves the
copy and nothing else: ``"auto"`` then computes in place unless the timings' noise says
otherwise (both sides compute alike). There it is exact either way: the
CPU computes each expert's rows with one ``mm`` of their own, as from a slot, so logits
stay bit for bit those of the fully loaded model (tested). On a GPU the CPU's rounding
differs from the GPU's, as in Fiddler.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

MODES = ("never", "auto", "always")
WIDE = 64  # rows of the second timing point of the linear fits


@dataclass(frozen=True)
class MissCost:
    """Measured seconds: one expert's copy into a slot (``transfer``), its compute for ``n``
    rows on the CPU, the rows sent there and back (``cpu_fixed + cpu_per_row·n``), and on
    the device from a slot (``device_fixed + device_per_row·n``)."""

    transfer: float
    cpu_fixed: float
    cpu_per_row: float
    device_fixed: float
    device_per_row: float
    mode: str = "auto"

    def in_place(self, rows: int) -> bool:
        """Compute a missed expert with ``rows`` rows routed to it on the CPU?"""
        if self.mode != "auto":
            return self.mode == "always"
        here = self.cpu_fixed + self.cpu_per_row * rows
        return here < self.transfer + self.device_fixed + self.device_per_row * rows

    def as_dict(self) -> dict:
        return {"mode": self.mode, "transfer_s": self.transfer, "cpu_s": [self.cpu_fixed, self.cpu_per_row],
                "device_s": [self.device_fixed, self.device_per_row]}


def cpu_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the CPU computes in: fp32 unless the model's dtype is wider (bf16 matmuls are
    8-100x slower than fp32 on the CPUs measured)."""
    return torch.promote_types(dtype, torch.float32)


class SlowTierCompute:
    """One layer's experts computed on the CPU from their slow-tier tensors ``{name: [E, ...]}``
    (CPU memory), in fp32 on the CPU unless the compute dtype is wider."""

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, scratch=None) -> None:
        self.tensors = tensors
        self.num_experts = next(iter(tensors.values())).shape[0]
        self.dtype = cpu_dtype(dtype)
        self.upcast = any(t.dtype != self.dtype for t in tensors.values())
        self.scratch = scratch  # a CPU `Scratch` of `scratch_numel` (shared: layers run one at a time)

    @staticmethod
    def scratch_numel(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
        """Elements of CPU scratch computing from ``tensors`` needs (0: none, no upcast)."""
        from moekit.runtime.offloaded_experts import SCRATCH_EXPERTS

        if all(t.dtype == cpu_dtype(dtype) for t in tensors.values()):
            return 0
        return SCRATCH_EXPERTS * sum(t[0].numel() for t in tensors.values())

    def send(self, rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """rows [R, H], index [R, 1], weights [R, 1] copied to the CPU. Called before the
        device's own experts are queued: a copy to the CPU waits for all work queued before
        it, so sending first lets the GPU compute the resident experts while the CPU
        computes these."""
        return rows.to("cpu", self.dtype), index.to("cpu"), weights.to("cpu", self.dtype)

    def run(self, module: nn.Module, sent: tuple[torch.Tensor, ...], experts: list[int]) -> torch.Tensor:
        """The `send` rows -> [R, H] on the CPU: each row routed to one of ``experts``
        weighted by its expert's output, every other row zero."""
        from moekit.runtime.offloaded_experts import grouped_call

        here, index, weights = sent
        sentinel = self.num_experts
        if not self.upcast:  # the fused tensors as they are: unchosen rows go to the sentinel
            chosen = torch.isin(index, torch.tensor(experts))
            out = grouped_call(module, here, torch.where(chosen, index, sentinel), weights, self.tensors,
                               self.num_experts)
            return torch.where(chosen, out, 0)
        out = torch.zeros_like(here)
        for expert in experts:  # upcast one expert at a time, as the cache's scratch does
            params = self.scratch.upcast(self.tensors, [expert], 2)
            mine = index == expert
            result = grouped_call(module, here, torch.where(mine, 0, 2), weights, params, 2)
            out = torch.where(mine, result, out)
        return out

    def one(self, module: nn.Module, forward, block: torch.Tensor, expert: int) -> torch.Tensor:
        """Llama-4's layout: ``forward(module, block [T, H])`` with ``expert``'s weights as the
        module's (a batch of one), on the CPU -> [T, H] on block's device."""
        saved = dict(module._parameters)
        module._parameters.update({name: t[expert:expert + 1].to(self.dtype) for name, t in self.tensors.items()})
        try:
            return forward(module, block.to("cpu", self.dtype)).to(block.device, block.dtype)
        finally:
            module._parameters.update(saved)


def measure_miss_cost(module: nn.Module, state, compute: SlowTierCompute, mode: str, *, hidden_size: int,
                      repeats: int = 3) -> MissCost:
    """`MissCost` of ``state``'s layer (an `OffloadedExperts`) on this machine: the copy of
    expert 0 into a spare buffer shaped like one slot, the compute from slot 0 (whatever it
    holds: only time is measured) and from the slow tier with the rows' round trip, each at
    1 and `WIDE` rows."""
    if mode != "auto":
        return MissCost(0.0, 0.0, 0.0, 0.0, 0.0, mode=mode)
    device = state.slot_table.device

    def timed(fn) -> float:
        fn()  # warm-up: first calls allocate
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def copy(spare={name: torch.empty_like(slots[0]) for name, slots in state.slots.items()}) -> None:
        with state.source.reading():
            state.source.read_into(0, spare)

    transfer = timed(copy)
    del copy  # and its spare expert
    cpu, dev = {}, {}
    for n in (1, WIDE):
        rows = torch.randn(n, hidden_size, dtype=state.dtype, device=device)
        first = torch.zeros(n, 1, dtype=torch.long, device=device)
        ones = torch.ones(n, 1, dtype=state.dtype, device=device)
        cpu[n] = timed(lambda: compute.run(module, compute.send(rows, first, ones), [0]).to(device))
        dev[n] = timed(lambda: state._run(module, rows, first, ones))
    per_row_cpu = max(cpu[WIDE] - cpu[1], 0.0) / (WIDE - 1)
    per_row_dev = max(dev[WIDE] - dev[1], 0.0) / (WIDE - 1)
    return MissCost(transfer, cpu[1] - per_row_cpu, per_row_cpu, dev[1] - per_row_dev, per_row_dev, mode)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attach(layers, states, sources, mode: str, dtype: torch.dtype, scratch, hidden_size: int) -> None:
    """Give every layer a `SlowTierCompute` and the cost model, measured once on the first
    layer (the layers' experts share their shapes)."""
    from moekit.runtime.offloaded_experts import Scratch

    need = max(SlowTierCompute.scratch_numel(sources[L.index].tensors, dtype) for L in layers)
    cpu = torch.device("cpu")
    if need and not (scratch.buffer.device == cpu and scratch.buffer.dtype == cpu_dtype(dtype)
                     and scratch.buffer.numel() >= need):  # the cache's own scratch, when it can serve
        scratch = Scratch(need, cpu_dtype(dtype), cpu)
    for layer, state in zip(layers, states):
        state.compute = SlowTierCompute(sources[layer.index].tensors, dtype, scratch)
    cost = measure_miss_cost(layers[0].experts.module, states[0], states[0].compute, mode, hidden_size=hidden_size)
    for state in states:
        state.cost = cost
