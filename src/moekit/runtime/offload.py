"""`moekit.offload`: a transformers model whose routed experts live in a slower tier.

    model = moekit.offload("moekit/ref-fine", expert_memory="4MB", policy="lfu", prefetch=True)
    model.generate(input_ids, max_new_tokens=32)      # everything transformers does
    model.moekit_offload.as_dict()                    # hit rate, bytes moved per token, ...

Non-expert weights (embeddings, attention, norms, routers, shared experts, head) are
loaded on ``device`` as usual. Each MoE layer's routed experts are served from a cache of
``capacity_l`` slots (`moekit.runtime.offloaded_experts`); the slow tier is the
checkpoint's safetensors read per expert on demand when the model is given as a folder
(`moekit.runtime.expert_store.DiskExperts`), or the model's own tensors in CPU memory when
it is given in memory (or is one of the built-in tiny models, which have no files), or a
folder's experts read once into CPU memory (``slow_tier="memory"``, the default on a GPU,
pinned there). From CPU memory a miss may be computed where it is instead of loaded
(``compute_misses``; `moekit.runtime.miss_compute`).

Budget: ``expert_memory`` bytes (or a share such as ``"25%"`` of the routed experts) over all
layers; experts are cached in the dtype the checkpoint stores them in when the compute dtype
holds it exactly (bf16 into fp32), so logits stay those of the fully loaded model. Every
layer first gets its top-k (a decoding token needs k experts at once; less is refused,
naming the minimum), the rest goes to the layers where it helps most
(`moekit.runtime.offload_budget`).

Prefetch (mixtral-offloading's speculative gating): a forward pre-hook on MoE block l
applies block l+1's router to block l's input and loads the guessed experts of l+1 before
l+1 runs. What to load (and evict) is decided on the caller's thread, so counters and
evictions are deterministic; the copies run on one background thread (on a GPU, queued on a
CUDA stream of their own), and layer l+1's call waits for its own before computing, so it
never changes outputs, only what is resident.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from moekit.errors import MoekitError, setting
from moekit.runtime import slow_tier as slow_tier_module
from moekit.runtime.expert_cache import POLICIES, LayerCache
from moekit.runtime.miss_compute import attach as attach_miss_compute
from moekit.runtime.offload_stats import OffloadStats


def offload(model: str | os.PathLike | nn.Module, *, expert_memory: int | str, device: str | torch.device = "cpu",
            policy: str = "lru", prefetch: bool = False, stats=None, dtype: torch.dtype = torch.float32,
            cache_dtype: torch.dtype | str = "auto", record_trace: bool = True, background: bool = True,
            slow_tier: str | None = None, compute_misses: str | None = None) -> nn.Module:
    """A model ready for ``generate`` with its routed experts offloaded.

    Args:
        model: a checkpoint folder or shipped name (experts read from its files), or a
            loaded model (experts kept in CPU memory as the slow tier; the model is changed
            in place).
        expert_memory: bytes of expert cache over all layers (int or ``"4GB"``, ``"512MiB"``),
            or a share of the routed experts' bytes in the cache dtype (``"25%"``; the
            scratch upcast experts are computed from comes on top).
        device: where non-expert weights, the cache and the compute are.
        policy: ``lru``, ``lfu`` or ``prior`` (needs ``stats``).
        prefetch: guess layer l+1's experts from layer l's input and load them early.
        stats: the prior's scores: a `CalibrationStats` (its ``frequency``; refused when its
            model fingerprint is another model's) or ``{layer: [E] scores}``.
        dtype: compute dtype (of the non-expert weights and of every expert call).
        cache_dtype: dtype of the cached experts: ``"auto"`` (each parameter as stored, when
            ``dtype`` holds it exactly: bf16 checkpoints take half the memory of fp32 copies,
            logits unchanged), or a dtype (one narrower than the stored one rounds the
            experts: logits then differ from the fully loaded model's).
        record_trace: keep every cache request in ``model.moekit_offload.trace``.
        background: prefetch copies on a background thread (the cache's decisions stay on
            the caller's thread, so counters and evictions do not depend on timing); on a
            GPU they are queued on a CUDA stream of their own.
        slow_tier: where a folder's experts are read from on a miss: ``"disk"`` (its
            safetensors, per expert; the default on a CPU device) or ``"memory"`` (every
            routed expert read once into CPU memory, pinned for a GPU: the default on a GPU
            device; needs RAM for all of them). A model given in memory is its own tier.
        compute_misses: ``"never"``, ``"auto"`` or ``"always"``: compute a missed expert on
            the CPU from the slow tier instead of loading it (Fiddler), as a cost model
            measured here decides (`moekit.runtime.miss_compute`). Default ``"auto"`` on a GPU
            with the slow tier in memory, else ``"never"``; needs the slow tier in memory.

    Returns:
        The model; ``model.moekit_offload`` is its `OffloadStats`.

    Raises:
        MoekitError: unknown policy, ``prior`` without statistics, a budget below every
            layer's top-k experts and the scratch to compute them from (the minimum is
            stated), a family whose experts cannot be offloaded, misses computed in place
            from a disk tier.
    """
    from moekit.arch.discover import moe_layers
    from moekit.runtime.offload_budget import allocate, budget_bytes, cache_dtype_for, parse_cache_dtype
    from moekit.runtime.offloaded_experts import IMPLEMENTATION, SCRATCH_EXPERTS, OffloadedExperts, Scratch, register

    if policy not in POLICIES:
        raise MoekitError(f"{setting('policy', policy)} is not one of {', '.join(POLICIES)}.")
    if policy == "prior" and stats is None:
        raise MoekitError("the prior policy pins the experts calibration saw most; pass stats= (moekit.calibrate's "
                          "result, or {layer: scores}).")  # `moekit run` asks for --stats before it gets here
    requested = parse_cache_dtype(cache_dtype)
    budget_bytes(expert_memory, 0)  # a malformed size is refused before the model is read
    _refuse_factored(model)
    device = torch.device(device)
    tier, mode = slow_tier_module.choose(model, device, slow_tier, compute_misses)
    if isinstance(model, nn.Module):
        _check_family(moe_layers(model))  # before anything of the model is moved
    model, sources = slow_tier_module.open_experts(model, device=device, dtype=dtype)
    layers = moe_layers(model)
    _check_family(layers)
    if hasattr(stats, "check_model"):  # a calibration's: of this very model
        stats.check_model(model)
    if mode == "auto" and any(_weighted_input(L) for L in layers):
        raise MoekitError(f"{setting('compute_misses', 'auto')} times transformers' grouped_mm experts path, which "
                          "Llama-4's experts do not take; choose 'always' or 'never'.")
    if tier == "memory":
        sources = {i: slow_tier_module.in_memory(source, pin=device.type == "cuda") for i, source in sources.items()}
    cached = {L.index: {name: cache_dtype_for(stored, dtype, requested)
                        for name, stored in sources[L.index].stored_dtypes().items()} for L in layers}
    numels = {L.index: {n: p[0].numel() for n, p in L.experts.module.named_parameters(recurse=False)
                        if p.shape[0] == L.num_experts} for L in layers}
    sizes = {i: sum(numel * cached[i][n].itemsize for n, numel in numels[i].items()) for i in numels}
    # upcast experts are computed from one scratch for all layers
    scratch = max((SCRATCH_EXPERTS * sum(numels[L.index].values()) * dtype.itemsize for L in layers
                   if any(d != dtype for d in cached[L.index].values())), default=0)
    budget = budget_bytes(expert_memory, sum(sizes[L.index] * L.num_experts for L in layers), scratch)
    priors = _priors(stats, layers) if policy == "prior" else {}
    stored = sorted({str(d).removeprefix("torch.") for c in cached.values() for d in c.values()})
    capacity = allocate(budget, {L.index: L.num_experts for L in layers}, {L.index: L.top_k for L in layers}, sizes,
                        priors or None, scratch=scratch, detail=f" in {'/'.join(stored)}")
    counters = OffloadStats(record_trace=record_trace)
    register()
    shared_scratch = Scratch(scratch // dtype.itemsize, dtype, device)
    states = []
    for layer in layers:
        cache = LayerCache(layer.num_experts, capacity[layer.index], policy, priors.get(layer.index),
                           top_k=layer.top_k)
        state = OffloadedExperts(layer.experts.module, layer.index, sources[layer.index], cache, device=device,
                                 dtype=dtype, cache_dtypes=cached[layer.index], stats=counters,
                                 scratch=shared_scratch)
        layer.experts.module._moekit_offload = state
        if _weighted_input(layer):
            layer.experts.module.forward = functools.partial(state.forward_weighted_input, layer.experts.module)
        states.append(state)
    if states:
        states[0].first = True
    if mode != "never":
        attach_miss_compute(layers, states, sources, mode, dtype, shared_scratch,
                            model.config.get_text_config().hidden_size)
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        for state in states:
            state.stream = stream
    model.config._experts_implementation = IMPLEMENTATION
    if prefetch:
        from concurrent.futures import ThreadPoolExecutor

        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch") if background else None
        for state in states:
            state.loader = loader
        _install_prefetch(layers, states)
    model.moekit_offload = counters
    model.moekit_capacity = capacity
    model.moekit_cache_dtype = "/".join(stored)
    model.moekit_expert_memory = budget
    model.moekit_slow_tier = tier
    model.moekit_miss_cost = states[0].cost if states and states[0].cost else None
    return model


def _weighted_input(layer) -> bool:
    """Llama-4: routing weights scale the experts' input and its experts module, which has no
    transformers experts implementation, multiplies every expert (`forward_weighted_input`)."""
    return layer.router.spec.weight_on_input and not hasattr(layer.experts.module, "_is_expert_parallel")


def _refuse_factored(model) -> None:
    """From the config alone, before any weight is read: a decompose output's experts are
    low-rank factors (`moekit.arch.factored`), not the per-expert weights the cache holds."""
    from moekit.arch.layout import FACTORED_KEY
    from moekit.io.load import load_config

    config = model.config if isinstance(model, nn.Module) else load_config(model)
    if getattr(config, FACTORED_KEY, None):
        raise MoekitError("this model's experts are factored (a decompose output in moekit's format), which "
                          "offloading cannot cache; write a standard checkpoint with moekit compress --materialize "
                          "and offload that.")


def _check_family(layers) -> None:
    for layer in layers:
        if _weighted_input(layer):
            continue
        if not hasattr(layer.experts.module, "_is_expert_parallel") or layer.router.spec.weight_on_input:
            raise MoekitError(f"{layer.family}'s experts do not take (hidden, top_k_index, top_k_weights) through "
                              "transformers' experts implementations; it cannot be offloaded yet.")


def _priors(stats, layers) -> dict[int, list[float]]:
    out = {}
    for layer in layers:
        scores = stats[layer.index]["frequency"] if hasattr(stats, "layers") else stats[layer.index]
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten().tolist()
        if len(scores) != layer.num_experts:
            raise MoekitError(f"the prior for layer {layer.index} has {len(scores)} scores; the layer has "
                              f"{layer.num_experts} experts (statistics of another model?).")
        out[layer.index] = scores
    return out


def _install_prefetch(layers, states) -> None:
    """Pre-hook on block l: guess block l+1's experts from block l's input."""
    for layer, (nxt, state) in zip(layers, zip(layers[1:], states[1:])):
        def guess(_module, args, kwargs, router=nxt.router, state=state):
            hidden = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                top_k_index, _ = router.route(router.logits(hidden.reshape(-1, hidden.shape[-1])))
            ids, counts = top_k_index.flatten().unique(return_counts=True)
            order = sorted(zip(counts.tolist(), ids.tolist()), key=lambda c: (-c[0], c[1]))
            state.prefetch([e for _, e in order])  # most-voted first: a cache too small takes those

        layer.block.register_forward_pre_hook(guess, with_kwargs=True)


def routed_expert_bytes(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of all routed experts of the model ``config`` describes, in ``dtype`` (from a
    skeleton on the ``meta`` device: nothing is read or allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from moekit.arch.discover import moe_layers

    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * size for layer in moe_layers(skeleton)
               for p in layer.experts.module.parameters(recurse=False) if p.shape[0] == layer.num_experts)
