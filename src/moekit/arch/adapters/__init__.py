"""The registry of families: adding one is a new module here and a line in `_MODULES`;
no method changes."""

from __future__ import annotations

import importlib

from torch import nn

from moekit.arch.adapters.base import Cfg, Family, Routing, Shared
from moekit.errors import UnsupportedModelError
from moekit.arch.versions import check_transformers

_MODULES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "phimoe",
    "granitemoe",
    "granitemoeshared",
    "ernie4_5_moe",
    "llama4",
)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (importlib.import_module(f"{__name__}.{name}").FAMILY for name in _MODULES)
}


def find_family(model: nn.Module) -> Family:
    """The family that can view ``model``, or an error naming its class, why each
    candidate refused, and the supported families. Every command passes here before it
    touches a model's MoE layout, which is transformers-version specific: a transformers
    outside moekit's range is refused here (`moekit.arch.versions`)."""
    check_transformers()
    reasons = []
    for family in FAMILIES.values():
        ok, why = family.supports(model, explain=True)
        if ok:
            return family
        if getattr(getattr(model, "config", None), "model_type", None) in family.model_types:
            reasons.append(why)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    raise UnsupportedModelError(not_an_moe(model_type, f"{type(model).__name__} (model_type {model_type!r})", detail))


def not_an_moe(model_type: str | None, what: str, detail: str = "") -> str:
    """The refusal for a model no family views; for a dense model moekit builds MoEs from,
    the commands that do."""
    from moekit.arch.adapters.dense import TARGETS

    fix = (" It is a dense model: `moekit upcycle` or `moekit split` builds an MoE from it."
           if model_type in TARGETS else "")
    return f"{what} is not a supported MoE model{detail}.{fix} Supported families: {', '.join(sorted(FAMILIES))}."


__all__ = ["FAMILIES", "Cfg", "Family", "Routing", "Shared", "find_family", "not_an_moe"]
