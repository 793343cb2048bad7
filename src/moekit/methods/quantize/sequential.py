"""Quantize one decoder layer in order, each sub-module from inputs that already went
through the quantized sub-modules before it (GPTQ's sequential quantization, arXiv
2210.17323 §4 "the inputs of the later layers are the outputs of the quantized earlier
ones", applied inside the decoder layer as llm-compressor's sequential pipeline does).

The layer is cut into *stages* without naming any module: one dry run on the first batch
records the order in which the layer calls its Linears and its MoE block, and Linears
that read the same input tensor (q, k, v; a dense MLP's gate and up; a shared expert's
gate and up with the routed experts) form one stage and share one Hessian. Each stage
then runs the layer over every calibration batch, accumulating its Hessians (or, for the
MoE block, keeping its inputs), and is quantized before the next stage runs.

Routed experts are quantized one at a time from the MoE block's inputs X and the
router's choices, so only one expert's Hessians exist at once (an expert's gate/up
Hessian is H×H: 52 GB for all 256 of DeepSeek-V3's at once):

- ``routed``: expert j's Hessian from the tokens routed to it, X_j;
- ``gate_weighted``: the same tokens, each weighted by its gate value g_j(x) (MoEQuant's
  affinity-guided quantization, arXiv 2505.03804);
- ``all``: every token (what llm-compressor and GPTQModel do to calibrate all experts).

With fewer than ``min_tokens`` routed tokens, ``routed`` and ``gate_weighted`` fall back
to ``all`` for that expert (reported), so an expert the calibration never routes to is
still quantized from data. Its down projection is calibrated on h_j(x) computed with its
already quantized gate/up.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from moekit.arch.layer import MoELayer, watching
from moekit.methods.quantize.gptq import HessianAccumulator, quantize_gptq
from moekit.methods.quantize.rtn import quantize_rtn
from moekit.methods.quantize.scheme import QuantizedWeight, QuantScheme

ExpertCalibration = Literal["routed", "all", "gate_weighted"]


@dataclass(frozen=True)
class LayerQuantization:
    """How to quantize a decoder layer.

    Attributes:
        method: ``rtn`` or ``gptq``.
        linear: scheme of every Linear outside the routed experts (attention, dense MLPs,
            shared experts); None leaves them as they are.
        experts: scheme of each routed expert (``experts(j)``); None leaves them.
        expert_calibration, min_tokens: see the module docstring.
        damp, act_order, block_size: GPTQ's settings (`quantize_gptq`).
        scale_dtype: the dtype the scales are saved in.
    """

    method: Literal["rtn", "gptq"] = "gptq"
    linear: QuantScheme | None = None
    experts: Callable[[int], QuantScheme] | None = None
    expert_calibration: ExpertCalibration = "routed"
    min_tokens: int = 16
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    scale_dtype: torch.dtype = torch.float32
    router_repair: bool = False
    router_ridge: float = 1e-2

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None, scheme: QuantScheme,
                 where: str) -> QuantizedWeight:
        if self.method == "rtn" or hessian is None:
            return quantize_rtn(weight, scheme, scale_dtype=self.scale_dtype, where=where)
        return quantize_gptq(weight, hessian, scheme, damp=self.damp, act_order=self.act_order,
                             block_size=self.block_size, scale_dtype=self.scale_dtype, where=where)

    @property
    def needs_data(self) -> bool:
        return self.method == "gptq"


@dataclass
class LayerResult:
    """What quantizing one layer produced.

    Attributes:
        linears: {module name in the layer: its quantized weight}.
        experts: per routed expert j, (gate_up, down) quantized weights, in expert order.
        tokens: calibration tokens routed to each expert.
        fallback: experts whose Hessians came from all tokens because too few were routed.
    """

    linears: dict[str, QuantizedWeight] = field(default_factory=dict)
    experts: list[tuple[QuantizedWeight, QuantizedWeight]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    fallback: list[int] = field(default_factory=list)
    agreement: tuple[float, float] | None = None  # top-k agreement with the reference, before/after repair


_MOE = "moe block"


def target_linears(layer: nn.Module, view: MoELayer | None) -> dict[str, nn.Linear]:
    """{name: module} of the layer's Linears that quantization may touch: everything but
    the router and a shared expert's scalar gate (routing stays in the source dtype)."""
    excluded: set[int] = set()
    if view is not None:
        excluded |= {id(view.router.module), id(view.experts.module)}
        if view.shared is not None and view.shared.gate_module is not None:
            excluded.add(id(view.shared.gate_module))
    inside_experts = set()
    if view is not None:
        inside_experts = {id(m) for m in view.experts.module.modules()}
    return {name: module for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and id(module) not in excluded and id(module) not in inside_experts}


def stages(layer: nn.Module, view: MoELayer | None, linears: dict[str, nn.Linear],
           run_first_batch: Callable[[ExitStack], None]) -> list[list[str]]:
    """The layer's stages in call order: lists of Linear names (and ``_MOE`` for the MoE
    block) that read the same input. Inputs are kept alive during the dry run so that a
    freed tensor's address cannot be mistaken for another's."""
    calls: list[tuple[str, tuple]] = []
    alive: list[torch.Tensor] = []

    def recorder(name):
        def hook(_module, args):
            x = args[0]
            alive.append(x)
            calls.append((name, (x.data_ptr(), x.numel())))
        return hook

    with ExitStack() as stack:
        for name, module in linears.items():
            stack.callback(module.register_forward_pre_hook(recorder(name)).remove)
        if view is not None:
            stack.callback(view.block.register_forward_pre_hook(recorder(_MOE)).remove)
        run_first_batch(stack)
    ordered: list[list[str]] = []
    keys: list[tuple] = []
    for name, key in calls:
        if any(name in stage for stage in ordered):
            continue  # a module called again (same stage, or already quantized)
        if keys and keys[-1] == key:
            ordered[-1].append(name)
        else:
            ordered.append([name])
            keys.append(key)
    return ordered


@torch.no_grad()
def quantize_layer(layer: nn.Module, view: MoELayer | None, spec: LayerQuantization, *,
                   run: Callable[..., None], on_progress: Callable[[str], None] | None = None,
                   reference_logits: torch.Tensor | None = None, world=None) -> LayerResult:
    """Quantize decoder layer ``layer`` (whose MoE block ``view`` shows, None for a dense
    layer) in place: its weights become the dequantized values, and the integers and scales
    are returned for the checkpoint.

    Args:
        run: ``run(observe, first_batch_only=False)`` runs the layer on the calibration
            batches while the context manager ``observe`` is open (`LayerInputs.run`).
        reference_logits: [N, E] the router's logits on the same tokens in the model before
            quantization; with ``spec.router_repair`` the router is re-fitted towards them
            (`repair_router`).
        world: a `moekit.distributed.World` when ``run`` pushes only this rank's share of
            the rows: the Hessians and the MoE block's inputs are then combined across
            ranks (the stage order, read from the first batch, is the same on every rank).
    """
    say = on_progress or (lambda status: None)
    linears = target_linears(layer, view) if spec.linear is not None else {}
    moe = view if spec.experts is not None else None
    result = LayerResult()
    if not spec.needs_data:  # round to nearest reads no inputs: nothing to run
        for name, module in linears.items():
            _quantize_linear(name, module, None, spec, result)
        if moe is not None:
            _quantize_experts(moe, None, spec, result, say)
        return result
    order = stages(layer, moe, linears, lambda stack: run(stack, first_batch_only=True))
    for number, stage in enumerate(order, start=1):
        say(f"quantize stage {number}/{len(order)}")
        names = [n for n in stage if n != _MOE]
        hessian = HessianAccumulator(linears[names[0]].in_features) if names else None
        kept: list[torch.Tensor] = []
        with ExitStack() as observe:
            if hessian is not None:  # the stage's Linears read one input: one Hessian
                observe.enter_context(watching(linears[names[0]], lambda x: hessian.add(x.float())))
            if _MOE in stage:
                observe.enter_context(watching(moe.block, lambda x: kept.append(
                    x.reshape(-1, x.shape[-1]).detach().float().cpu())))
            run(observe)
        if world is not None:  # every rank computes the same edit from every rank's rows
            from moekit.distributed.collectives import gather_batches

            if hessian is not None:
                hessian.reduce(world)
            if _MOE in stage:
                kept = gather_batches(kept, world, moe.experts.hidden_size, "gathering the MoE block's inputs")
        h = hessian.finish() if hessian is not None else None  # one Hessian for the stage's Linears
        for name in names:
            _quantize_linear(name, linears[name], h, spec, result)
        if _MOE in stage:
            hidden = torch.cat(kept)
            _quantize_experts(moe, hidden, spec, result, say)
            if reference_logits is not None:
                result.agreement = repair_router(moe, hidden, reference_logits, ridge=spec.router_ridge,
                                                 refit=spec.router_repair)
    return result


def topk_agreement(index: torch.Tensor, reference: torch.Tensor, num_experts: int) -> float:
    """Mean over tokens of |chosen ∩ chosen by the reference| / k; index, reference [N, k]."""
    if not index.numel():
        return 1.0
    chosen = torch.zeros(index.shape[0], num_experts).scatter_(1, index.cpu(), 1.0)
    wanted = torch.zeros(index.shape[0], num_experts).scatter_(1, reference.cpu(), 1.0)
    return float((chosen * wanted).sum() / index.numel())


@torch.no_grad()
def repair_router(view: MoELayer, hidden: torch.Tensor, reference_logits: torch.Tensor, *, ridge: float,
                  refit: bool = True) -> tuple[float, float]:
    """Re-fit the router so that, on the quantized model's block inputs ``hidden`` [N, H],
    its logits match the original model's ``reference_logits`` [N, E] on the same tokens:
    quantization moves the inputs, and a router that stays put flips top-k choices
    (EAC-MoE's QESC re-calibrates the router for this reason). Ridge
    least squares, W = argmin ‖X Wᵀ + b − L‖² + λ‖W‖², λ = ridge · mean diag XᵀX; kept only
    if the top-k agreement with the original choices improves. Returns the agreement
    before and after."""
    router = view.router
    x = hidden.to(router.weight.device, router.weight.dtype)
    target = router.route(reference_logits.to(x))[0]
    before = topk_agreement(router.route(router.logits(x))[0], target, view.num_experts)
    if not refit or not x.shape[0]:
        return before, before
    goal = reference_logits.double().to(x.device)
    if router.bias is not None:
        goal = goal - router.bias.double()
    features = x.double()
    gram = features.T @ features
    gram += ridge * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                           device=gram.device)
    fitted = torch.linalg.solve(gram, features.T @ goal).T  # [E, H]
    original = router.weight.data.clone()
    router.weight.data.copy_(fitted.to(original.dtype))
    after = topk_agreement(router.route(router.logits(x))[0], target, view.num_experts)
    if after < before:  # least squares on logits is a proxy for the choices: keep what selects better
        router.weight.data.copy_(original)
        after = before
    return before, after


def _quantize_linear(name: str, module: nn.Linear, hessian: torch.Tensor | None, spec: LayerQuantization,
                     result: LayerResult) -> None:
    quantized = spec.quantize(module.weight.data, hessian, spec.linear, name)
    module.weight.data.copy_(quantized.dequantized.to(module.weight.dtype))
    result.linears[name] = quantized


def _quantize_experts(view: MoELayer, hidden: torch.Tensor | None, spec: LayerQuantization, result: LayerResult,
                      say: Callable[[str], None]) -> None:
    """Each routed expert in turn (``hidden`` [N, H]: the MoE block's inputs; None for
    round to nearest, which reads none)."""
    experts = view.experts
    dtype = experts.gate_up.dtype
    routing = None
    if hidden is not None:
        x = hidden.to(experts.gate_up.device, dtype)
        routing = view.router.route(view.router.logits(x))
    everyone = None  # the all-token gate/up Hessian is the same for every expert: computed once
    for j in range(view.num_experts):
        say(f"quantize expert {j + 1}/{view.num_experts}")
        scheme = spec.experts(j)
        where = f"layer {view.index} expert {j}"
        hessian_in = inputs = gate = None
        if routing is not None:
            token, slot = torch.where(routing[0] == j)
            result.tokens.append(int(token.numel()))
            mode = spec.expert_calibration
            if mode != "all" and token.numel() < spec.min_tokens:
                mode = "all"
                result.fallback.append(j)
            if mode == "all":
                inputs = x
                everyone = _hessian(x, None) if everyone is None else everyone
                hessian_in = everyone
            else:
                inputs = x[token]
                gate = routing[1][token, slot].float() if mode == "gate_weighted" else None
                hessian_in = _hessian(inputs, gate)
        gate_up = spec.quantize(experts.gate_up[j], hessian_in, scheme, f"{where} gate_up")
        experts.gate_up[j].copy_(gate_up.dequantized.to(dtype))
        # the down projection is calibrated on what the quantized gate/up produce (sequential)
        hessian_mid = None if inputs is None else _hessian(experts.intermediate(j, inputs), gate)
        down = spec.quantize(experts.down[j], hessian_mid, scheme, f"{where} down")
        experts.down[j].copy_(down.dequantized.to(dtype))
        result.experts.append((gate_up, down))


def _hessian(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    accumulator = HessianAccumulator(x.shape[-1])
    if x.shape[0]:
        accumulator.add(x.float(), weight)
    return accumulator.finish()
