"""Installing a dynamic routing policy on a loaded model, and counting expert calls.

A policy rewrites what each MoE block hands its experts: a forward pre-hook on the fused
experts module turns (top_k_index, top_k_weights) into the kept subset, pointing dropped
slots at expert E with weight 0. E is transformers' own "no expert" sentinel (the one its
expert-parallel dispatch uses): the eager experts forward skips it, and the grouped_mm
forward sorts it past the last group and never multiplies it once the module's
``_is_expert_parallel`` flag turns that masking on, which installing does. So a dropped
expert is not computed (tests count the token–expert pairs the experts see); only
``batched_mm``, which has no way to skip rows, still multiplies and zeroes them.

Every family whose block calls ``experts(hidden, top_k_index, top_k_weights)`` works; Llama-4
(weights scale the experts' input, top-1) is refused, and so is GPT-OSS under the eager
experts implementation (its eager forward rejects the sentinel). The policy is recorded in the config
under ``moekit_routing_policy``, so a saved model carries it and `moekit.load` (and the
layer-streamed readers) install it again; plain transformers ignores the field and routes
as the original model did.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from moekit.arch.layout import POLICY_KEY
from moekit.errors import MoekitError
from moekit.methods.dynamic.policy import _Policy, apply_keep, policy_from_dict

_INSTALLED = "_moekit_policy_handle"


def renormalizes(spec) -> bool:
    """Does the family divide the chosen weights by their sum (so kept ones are rescaled)?"""
    return spec.norm_topk_prob or (spec.topk_before_scoring and spec.scoring == "softmax")


def set_routing_policy(model: nn.Module, policy: _Policy | dict | None) -> None:
    """Route ``model`` with ``policy`` from now on (replacing any installed one), or, with
    None, exactly as before any policy. Also records it in ``model.config``.

    Raises:
        MoekitError: the family cannot take a policy, or a per-layer policy misses a layer.
    """
    from moekit.arch.discover import moe_layers

    layers = moe_layers(model)
    if policy is not None:  # every check before anything changes: a refusal leaves the model as it was
        policy = _validated(policy) if isinstance(policy, dict) else policy
        for layer in layers:
            _check(model, layer)
            try:
                policy.value_at(layer.index)
            except KeyError as exc:
                raise MoekitError(f"{exc.args[0]}; give a value for every MoE layer or one for all.") from None
    for layer in layers:
        _uninstall(layer.experts.module)
    if policy is None:
        if hasattr(model.config, POLICY_KEY):
            delattr(model.config, POLICY_KEY)
        return
    for layer in layers:
        _install(layer.experts.module, policy, layer.index, layer.num_experts, renormalizes(layer.router.spec))
    setattr(model.config, POLICY_KEY, policy.model_dump(mode="json"))


def set_layer_policy(model: nn.Module, layer, policy: _Policy) -> None:
    """Route the MoE layer ``layer`` (a `moekit.MoELayer` of ``model``) with ``policy``'s value
    for it, leaving the other layers as they are; the config then records one value per
    layer set so far (a streamed pass sets the layers one by one)."""
    _check(model, layer)
    value = policy.value_at(layer.index)
    recorded = routing_policy(model)
    values = {}
    if recorded is not None and recorded.with_value(1.0) == policy.with_value(1.0):  # same policy, other layers
        free = getattr(recorded, recorded.free)
        values = dict(free) if isinstance(free, dict) else {}
    policy = policy.with_value({**values, layer.index: value})
    _uninstall(layer.experts.module)
    _install(layer.experts.module, policy, layer.index, layer.num_experts, renormalizes(layer.router.spec))
    setattr(model.config, POLICY_KEY, policy.model_dump(mode="json"))


def _check(model: nn.Module, layer) -> None:
    from moekit.arch.discover import family_of

    family = family_of(model)
    if getattr(model.config, "_experts_implementation", None) == "eager" and not family.eager_skips_sentinel:
        raise MoekitError(f"transformers' eager {family.name} experts cannot skip an expert; use the grouped_mm "
                          "experts implementation (moekit's default) to run a routing policy.")
    if layer.router.spec.weight_on_input:
        raise MoekitError(f"{layer.family} scales its experts' input by the routing weight; a routing policy "
                          "cannot drop experts there.")


def _validated(data: dict) -> _Policy:
    from pydantic import ValidationError

    from moekit.errors import validation_problems

    try:
        return policy_from_dict(data)
    except ValidationError as exc:
        raise MoekitError(f"invalid routing policy: {validation_problems(exc)}; the kinds are skip (beta), "
                          "threshold (p, min_k, max_k) and kmin_threshold (kmin, t).") from None


def routing_policy(model: nn.Module) -> _Policy | None:
    """The policy recorded in ``model``'s config, or None."""
    data = getattr(model.config, POLICY_KEY, None)
    return policy_from_dict(data) if data else None


def reinstall_saved_policy(model: nn.Module) -> None:
    """Install the policy a loaded checkpoint's config records (nothing if none)."""
    if (policy := routing_policy(model)) is not None:
        set_routing_policy(model, policy)


def _install(experts: nn.Module, policy: _Policy, index: int, num_experts: int, renormalize: bool) -> None:
    def rewrite(_module, args, kwargs):
        hidden, top_k_index, top_k_weights, *rest = args
        keep = policy.keep(top_k_weights, index)
        top_k_index, top_k_weights = apply_keep(top_k_index, top_k_weights, keep, num_experts=num_experts,
                                                renormalize=renormalize)
        return (hidden, top_k_index, top_k_weights, *rest), kwargs

    # prepend: counters attached earlier must see what the experts will compute
    handle = experts.register_forward_pre_hook(rewrite, with_kwargs=True, prepend=True)
    setattr(experts, _INSTALLED, (handle, getattr(experts, "_is_expert_parallel", None)))
    experts._is_expert_parallel = True


def _uninstall(experts: nn.Module) -> None:
    installed = getattr(experts, _INSTALLED, None)
    if installed is None:
        return
    handle, flag = installed
    handle.remove()
    delattr(experts, _INSTALLED)
    if flag is None:
        del experts._is_expert_parallel
    else:
        experts._is_expert_parallel = flag


@dataclass
class ExpertCalls:
    """Token–expert pairs the experts computed, per MoE layer (decoder index)."""

    pairs: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)

    def per_layer(self) -> dict[int, float]:
        """Mean experts computed per token, per layer."""
        return {i: self.pairs[i] / self.tokens[i] for i in sorted(self.pairs) if self.tokens[i]}

    def overall(self) -> float:
        """Mean over layers of the mean experts per token (layers weigh equally)."""
        values = list(self.per_layer().values())
        return sum(values) / len(values) if values else float("nan")


@contextmanager
def counting_expert_calls(model: nn.Module) -> Iterator[ExpertCalls]:
    """While open, count the token–expert pairs each layer's experts receive (slots that
    point at a real expert, after any policy), and the tokens."""
    from moekit.arch.discover import moe_layers

    calls = ExpertCalls()
    handles = []
    for layer in moe_layers(model):
        def count(_module, args, index=layer.index, experts=layer.num_experts):
            top_k_index = args[1]
            calls.pairs[index] = calls.pairs.get(index, 0) + int((top_k_index < experts).sum())
            calls.tokens[index] = calls.tokens.get(index, 0) + top_k_index.shape[0]

        handles.append(layer.experts.module.register_forward_pre_hook(count))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()

