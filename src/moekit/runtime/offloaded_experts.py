"""One MoE layer's experts computed from a bounded cache of resident experts.

How it plugs in: transformers' fused experts modules dispatch their forward through
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` by the config's
``_experts_implementation``. moekit registers one more implementation there,
``"moekit_offload"``, and sets the offloaded model's config to it — transformers' own
mechanism, as the issue asks, and cleaner than a forward pre-hook: a pre-hook can rewrite
``(hidden, top_k_index, top_k_weights)`` but not the computation, and a prefill that needs
more experts than the cache holds must compute in parts. No module is replaced, so
moekit's view (`moe_layers`), routing policies (their pre-hooks still run first) and
counters keep working.

Per call (``hidden [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]``):
1. the experts the call needs (ids < E; E is the "no expert" sentinel of routing
   policies) are made resident by the layer's `LayerCache`; misses are read from the slow
   tier (`moekit.runtime.expert_store`) into their slots;
2. ids are mapped to slots and transformers' ``grouped_mm`` forward runs with the module's
   parameters swapped for the slot buffers ``[C, ...]`` — only resident weights are used;
3. when the call needs more than C experts it runs in parts, one row per (token, choice)
   so each part yields each row's own weighted output; rows are summed over the k choices
   once, at the end, exactly as ``grouped_mm`` sums them. So the result equals, bit for
   bit, the fully loaded model under ``grouped_mm`` (moekit's default; tests compare logits
   with ``torch.equal``).
4. slots kept in a dtype other than the compute dtype (a bf16 checkpoint's experts, fp32
   compute: `moekit.runtime.offload_budget`) are upcast one expert at a time into a small
   `Scratch` and computed as a part (as in 3). On CPU ``grouped_mm`` multiplies each
   expert's rows by one ``mm`` of their own (checked: the same bits as a loop of
   ``torch.mm``), so which experts share a call does not change a row, and an exact upcast
   leaves the logits bit for bit equal.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moekit.runtime.expert_cache import LayerCache, Step
from moekit.runtime.offload_stats import OffloadStats

IMPLEMENTATION = "moekit_offload"


class OffloadedExperts:
    """The cache state of one experts module (kept as ``module._moekit_offload``).

    Args:
        module: the fused experts module (its parameters are replaced by meta tensors).
        layer: decoder index, for counters and traces.
        source: a slow-tier reader (`moekit.runtime.expert_store`): ``read_into(e, {name:
            slot view [...]})`` inside ``reading()``.
        cache: the layer's `LayerCache`.
        device, dtype: where the slot buffers live, and the compute dtype.
        cache_dtypes: each fused parameter's slot dtype (default: ``dtype``).
        stats: the shared counters.
        scratch: where slots in another dtype are upcast for a call (shared by all layers).
    """

    def __init__(self, module: nn.Module, layer: int, source, cache: LayerCache, *, device: torch.device,
                 dtype: torch.dtype, stats: OffloadStats, cache_dtypes: dict[str, torch.dtype] | None = None,
                 scratch: Scratch | None = None) -> None:
        self.layer = layer
        self.source = source
        self.cache = cache
        self.stats = stats
        self.num_experts = cache.num_experts
        self.first = False  # set on the shallowest offloaded layer: it counts tokens
        self.guess: set[int] | None = None  # the prefetch guess for the next call
        self.loader = None  # a one-thread executor: prefetch copies in the background
        self.pending = None  # its copy for this layer not yet waited for
        self.stream = None  # a CUDA stream prefetch copies run on (GPU devices)
        self.compute = None  # a `SlowTierCompute`: misses the `cost` says so are computed in place
        self.cost = None
        self.params = {name: p for name, p in module.named_parameters(recurse=False) if p.shape[0] == self.num_experts}
        cache_dtypes = cache_dtypes or {}
        self.slots = {name: nn.Parameter(torch.empty((cache.capacity, *p.shape[1:]), device=device,
                                                     dtype=cache_dtypes.get(name, dtype)), requires_grad=False)
                      for name, p in self.params.items()}
        self.dtype = dtype
        self.scratch = scratch if any(s.dtype != dtype for s in self.slots.values()) else None
        # experts one computation may use: all resident ones, or top-k when they are upcast first
        # experts one grouped_mm multiplies: all resident ones, or one at a time when upcast (it is
        # multiplied while its fp32 copy is still in the CPU's cache: measured 1.5x faster per
        # decode layer than upcasting top-k first)
        self.group = cache.capacity if self.scratch is None else 1
        self.expert_bytes = sum(s[0].numel() * s.element_size() for s in self.slots.values())
        for name, p in self.params.items():
            module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        self.meta = dict(module._parameters)
        # expert id -> slot; the sentinel E (and anything not resident) -> C, which grouped_mm skips
        self.slot_table = torch.full((self.num_experts + 1,), cache.capacity, dtype=torch.long, device=device)
        warm = cache.warm()
        self._apply(warm)
        stats.warm_bytes += len(warm.loads) * self.expert_bytes

    # -- cache traffic ----------------------------------------------------------------
    def _apply(self, step: Step, background=None) -> int:
        """Record ``step`` and copy its loaded experts into their slots (on ``background``, a
        one-thread executor, when given: the next call of this layer waits for it, so the
        copy overlaps whatever runs until then); returns bytes moved."""
        self.stats.evictions.extend((self.layer, e) for e in step.evictions)  # here: in the order decided
        if background is not None and step.loads:
            self._wait()
            # on a GPU the copies go on their own stream, queued after what the compute
            # stream has queued so far (it may still read the slots being replaced)
            after = torch.cuda.current_stream(self.slot_table.device) if self.stream is not None else None
            self.pending = background.submit(self._copy, step, after)
        else:
            self._copy(step)
        return len(step.loads) * self.expert_bytes

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            done = pending.result()  # re-raises a failed read (a vanished folder) here, in the caller
            if done is not None:  # a CUDA event: the compute stream waits for the copies, the CPU does not
                torch.cuda.current_stream(self.slot_table.device).wait_event(done)

    def _copy(self, step: Step, after=None):
        """Evict and load ``step``'s experts; on the copy stream when ``after`` (the compute
        stream to follow) is given, returning the event that marks the copies done."""
        stream = self.stream if after is not None else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None:
                stream.wait_stream(after)
            for expert in step.evictions:
                self.slot_table[expert] = self.cache.capacity
            if step.loads:
                with self.source.reading():
                    for expert, slot in step.loads:
                        # copy_ casts the stored dtype to the compute dtype exactly
                        self.source.read_into(expert, {name: slots[slot] for name, slots in self.slots.items()})
                        self.slot_table[expert] = slot
            if stream is None:
                return None
            done = torch.cuda.Event()
            done.record(stream)
            return done

    def prefetch(self, experts: list[int]) -> None:
        """Load guessed experts before the call that needs them (counted as moved bytes)."""
        experts = [e for e in experts if e < self.num_experts]
        step = self.cache.prefetch(experts)
        if self.stats.record_trace:
            self.stats.trace.append(("prefetch", self.layer, list(experts[:self.cache.capacity])))
        self.stats.prefetch_loads += len(step.loads)
        self.stats.bytes_moved += self._apply(step, self.loader)
        self.guess = set(experts)

    def _request(self, experts: list[int]) -> None:
        step = self.cache.request(experts)
        self.stats.add(self.stats.hits, self.layer, len(step.hits))
        self.stats.add(self.stats.misses, self.layer, len(step.loads))
        self.stats.bytes_moved += self._apply(step)

    def _in_place(self, rows_of: dict[int, int]) -> list[int]:
        """Missed experts to compute where they are rather than load (none without a
        `SlowTierCompute`); counted as misses, and as a use of each for LFU."""
        if self.compute is None:
            return []
        chosen = [e for e, n in sorted(rows_of.items()) if e not in self.cache.slot_of and self.cost.in_place(n)]
        if chosen:
            self.cache.note(chosen)
            self.stats.add(self.stats.misses, self.layer, len(chosen))
            self.stats.add(self.stats.in_place, self.layer, len(chosen))
        return chosen

    def _demand(self, needed: list[int], tokens: int, requested: list[int]) -> None:
        """Start a call of ``tokens`` tokens that needs ``needed`` (``requested`` of them
        from the cache, the trace's record): wait for this layer's background prefetch,
        count, record, and score the guess made for it."""
        self._wait()
        if self.first:
            self.stats.tokens += tokens
        if self.stats.record_trace:
            self.stats.trace.append(("demand", self.layer, requested))
        if self.guess is not None:
            self.stats.score_guess(self.guess, set(needed))
            self.guess = None

    # -- compute ----------------------------------------------------------------------
    def forward(self, module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
        ids, counts = top_k_index.unique(return_counts=True)
        rows_of = {e: n for e, n in zip(ids.tolist(), counts.tolist()) if e < self.num_experts}
        needed = sorted(rows_of)
        in_place = self._in_place(rows_of)
        loaded = [e for e in needed if e not in in_place]
        self._demand(needed, hidden.shape[0], loaded)
        parts = self.cache.plan(loaded)
        table = self.slot_table
        index = top_k_index.clamp(max=self.num_experts)
        if not in_place and len(parts) <= 1 and len(needed) <= self.group:
            if parts:
                self._request(parts[0])
            return self._run(module, hidden, table[index], top_k_weights)
        tokens, k = top_k_index.shape
        rows = hidden.repeat_interleave(k, dim=0)  # [T·k, H]: row t·k + j is token t's j-th choice
        flat_index, flat_weights = index.reshape(-1, 1), top_k_weights.reshape(-1, 1)
        out = torch.zeros_like(rows)
        if in_place:  # where the weights are (`moekit.runtime.miss_compute`): rows there first
            sent = self.compute.send(rows, flat_index, flat_weights)
            self.stats.activation_bytes += 2 * sum(rows_of[e] for e in in_place) * rows[0].nbytes
        for part in parts:
            self._request(part)
            for start in range(0, len(part), self.group):
                # every row goes in, the others' as skipped: elementwise kernels (GPT-OSS's gate)
                # round a row by where it sits in the tensor, so each call keeps the full shape
                group = torch.tensor(part[start:start + self.group], device=flat_index.device)
                in_group = torch.isin(flat_index, group)
                slots = torch.where(in_group, table[flat_index], self.cache.capacity)
                out = torch.where(in_group, self._run(module, rows, slots, flat_weights), out)
        if in_place:  # the CPU computes while the device runs what was queued above
            computed = self.compute.run(module, sent, in_place).to(rows.device, rows.dtype)
            out = torch.where(torch.isin(flat_index, torch.tensor(in_place, device=flat_index.device)), computed, out)
        return out.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)

    def forward_weighted_input(self, module: nn.Module, routed_in: torch.Tensor) -> torch.Tensor:
        """Llama-4's experts (no transformers experts implementation: the module's own
        ``forward``, replaced on the instance): ``routed_in [E·T, H]`` holds every token for
        every expert, already scaled by its routing weight, so an expert no token chose gets
        only zero rows and gives exact zeros (no bias; act(0)·0 = 0). Only experts with a
        nonzero row are loaded, each multiplied by the module's own forward on its full
        ``[T, H]`` block as a batch of one; the others' outputs are left zero, as they are
        in the full model. -> ``[E·T, H]``."""
        blocks = routed_in.view(self.num_experts, -1, routed_in.shape[-1])
        needed = blocks.ne(0).flatten(1).any(dim=1).nonzero().flatten().tolist()
        in_place = self._in_place(dict.fromkeys(needed, blocks.shape[1]))
        loaded = [e for e in needed if e not in in_place]
        self._demand(needed, blocks.shape[1], loaded)
        out = torch.zeros_like(blocks)
        forward = type(module).forward
        for expert in in_place:
            self.stats.activation_bytes += 2 * blocks[expert].nbytes
            out[expert] = self.compute.one(module, forward, blocks[expert], expert)
        for part in self.cache.plan(loaded):
            self._request(part)
            for expert in part:
                module._parameters.update(self._weights([int(self.slot_table[expert])], 1))
                try:
                    out[expert] = forward(module, blocks[expert])
                finally:
                    module._parameters.update(self.meta)
        return out.view_as(routed_in)

    def _weights(self, slots: list[int], n: int) -> dict[str, torch.Tensor]:
        """The parameters ``[n, ...]`` whose first rows are ``slots``' experts in the compute
        dtype: views of the slots when they are in it (``slots`` consecutive), else upcast
        into the scratch."""
        if self.scratch is None:
            return {name: s[slots[0]:slots[0] + n] for name, s in self.slots.items()}
        return self.scratch.upcast(self.slots, slots, n)

    def _run(self, module: nn.Module, hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor):
        params, count = self.slots, self.cache.capacity
        if self.scratch is not None:  # upcast the slots this call uses; renumber them 0..n-1 (n = skipped)
            used = slots[slots < count].unique()
            # at least 2: grouped_mm's histc(bins=1, min=0, max=0) takes its range from the data,
            # counts the skipped rows in, and multiplies a taller matrix (other bits)
            n = max(len(used), 2)
            params = self._weights(used.tolist(), n)
            renumber = torch.full((count + 1,), n, dtype=torch.long, device=slots.device)
            renumber[used] = torch.arange(len(used), device=slots.device)
            slots, count = renumber[slots], n
        elif count == 1:  # a one-slot cache (top-1): a second, never-used expert, for the reason above
            params = {name: s.expand(2, *s.shape[1:]).contiguous() for name, s in self.slots.items()}
            slots, count = slots.masked_fill(slots >= 1, 2), 2
        return grouped_call(module, hidden, slots, weights, params, count)


def grouped_call(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                 params: dict[str, torch.Tensor], count: int) -> torch.Tensor:
    """transformers' ``grouped_mm`` forward of ``module`` with its fused parameters swapped for
    ``params`` ``{name: [count, ...]}`` (index ``count`` = a skipped row), then put back."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    saved = (dict(module._parameters), module.num_experts, module._is_expert_parallel)
    module._parameters.update(params)
    module.num_experts, module._is_expert_parallel = count, True  # expert `count` = skipped sentinel
    try:
        return grouped_mm_experts_forward(module, hidden, index, weights)
    finally:
        module._parameters.update(saved[0])
        module.num_experts, module._is_expert_parallel = saved[1:]


SCRATCH_EXPERTS = 2  # one upcast expert computed at a time; 2 for grouped_mm's histc (see `_run`)


class Scratch:
    """One flat buffer of ``numel`` elements of ``dtype`` that upcast experts are written
    into, one call at a time (layers run one after another, so all share it)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffer = torch.empty(numel, dtype=dtype, device=device)

    def views(self, shapes: dict[str, torch.Size], n: int) -> dict[str, torch.Tensor]:
        """``{name: [n, *shape]}`` views of the buffer, one after another."""
        out, offset = {}, 0
        for name, shape in shapes.items():
            size = n * shape.numel()
            out[name] = self.buffer[offset:offset + size].view(n, *shape)
            offset += size
        return out

    def upcast(self, fused: dict[str, torch.Tensor], rows: list[int], n: int) -> dict[str, torch.Tensor]:
        """``{name: [n, ...]}`` views whose first rows are ``fused[name][rows]`` cast to the
        buffer's dtype (the other rows hold whatever they held: no index selects them)."""
        params = self.views({name: t.shape[1:] for name, t in fused.items()}, n)
        for i, row in enumerate(rows):
            for name, buffer in params.items():
                buffer[i].copy_(fused[name][row])
        return params


def offloaded_experts_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``moekit_offload`` experts implementation (registered with transformers)."""
    state = getattr(module, "_moekit_offload", None)
    if state is None:  # an experts module of this model that was not offloaded
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(module, hidden, top_k_index, top_k_weights)
    return state.forward(module, hidden, top_k_index, top_k_weights)


def register() -> None:
    """Make ``"moekit_offload"`` a transformers experts implementation (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, offloaded_experts_forward)
