"""Factored routed experts: each projection stored as low-rank factors (plus an optional
base shared by the layer's experts), computed from the factors.

`FactoredExperts` stands where a family's fused experts module was (the `decompose` step
puts it there; `moekit.load` puts it back from the config). The family's MoE block calls
it exactly as it calls transformers' experts, ``experts(hidden, top_k_index,
top_k_weights)``, and it computes

    gate_up_j(x) = B_j (A_j x) [+ W_b x]        down_j(h) = D_j (C_j h) [+ V_b h]

so a token costs r(in + out) multiply-adds per projection instead of in·out. The shared
bases are linear and common to all experts, so they run once per token, not once per
chosen expert: W_b x once, and V_b Σ_j g_j h_j once for the weighted sum of the chosen
experts' activations. Slots routed to expert E (transformers' "no expert" sentinel, what
routing policies write) are skipped.

Storage (moekit's format, `moekit.io.nonuniform`): ``experts.gate_up_a.<j>`` [r_j, H],
``experts.gate_up_b.<j>`` [2I, r_j], ``experts.down_a.<j>`` [s_j, I], ``experts.down_b.<j>``
[H, s_j], and with a base ``experts.gate_up_base`` [2I, H], ``experts.down_base`` [H, I];
config.json's ``moekit_factored_experts`` = {layer: {"gate_up": [r_j], "down": [s_j],
"base": bool}} says the shapes. The canonical view (`moekit.arch.experts.Experts`) reads
``gate_up_proj`` / ``down_proj`` as the products, so statistics and evaluation see the
factored experts' weights; writing through those views has no effect (they are copies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moekit.arch.layout import FACTORED_KEY
from moekit.errors import MoekitError


class FactoredExperts(nn.Module):
    """One layer's routed experts as factors (see the module docstring)."""

    moekit_factored = True

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int,
                 gate_up_ranks: Sequence[int], down_ranks: Sequence[int], base: bool, act_fn,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if len(gate_up_ranks) != num_experts or len(down_ranks) != num_experts:
            raise MoekitError(f"factored experts: {num_experts} experts but {len(gate_up_ranks)} gate/up and "
                              f"{len(down_ranks)} down ranks.")
        H, I = hidden_size, intermediate_size

        def empty(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))

        self.gate_up_a = nn.ParameterList([empty(r, H) for r in gate_up_ranks])
        self.gate_up_b = nn.ParameterList([empty(2 * I, r) for r in gate_up_ranks])
        self.down_a = nn.ParameterList([empty(r, I) for r in down_ranks])
        self.down_b = nn.ParameterList([empty(H, r) for r in down_ranks])
        self.gate_up_base = empty(2 * I, H) if base else None
        self.down_base = empty(H, I) if base else None
        self.act_fn = act_fn
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, H, I

    # -- structure ----------------------------------------------------------------------
    @property
    def has_base(self) -> bool:
        return self.gate_up_base is not None

    def ranks(self) -> dict:
        """What config.json records for this layer."""
        return {"gate_up": [p.shape[0] for p in self.gate_up_a], "down": [p.shape[0] for p in self.down_a],
                "base": self.has_base}

    def active_params(self, top_k: int) -> float:
        """Parameters one token uses on average: the bases always, top_k / E of the factors."""
        base = sum(p.numel() for p in (self.gate_up_base, self.down_base) if p is not None)
        factors = sum(p.numel() for p in self.parameters()) - base
        return base + factors * top_k / self.num_experts

    # -- the products (canonical orientation), for the view and for materializing ----------
    def expert_gate_up(self, j: int) -> torch.Tensor:
        """[2I, H]."""
        product = self.gate_up_b[j] @ self.gate_up_a[j]
        return product + self.gate_up_base if self.has_base else product

    def expert_down(self, j: int) -> torch.Tensor:
        """[H, I]."""
        product = self.down_b[j] @ self.down_a[j]
        return product + self.down_base if self.has_base else product

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """[E, 2I, H], computed (a copy)."""
        return torch.stack([self.expert_gate_up(j) for j in range(self.num_experts)])

    @property
    def down_proj(self) -> torch.Tensor:
        """[E, H, I], computed (a copy)."""
        return torch.stack([self.expert_down(j) for j in range(self.num_experts)])

    # -- compute --------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
        out = torch.zeros_like(hidden_states)
        base_in = hidden_states @ self.gate_up_base.T if self.has_base else None  # once per token
        mixed = torch.zeros(hidden_states.shape[0], self.intermediate_dim, dtype=hidden_states.dtype,
                            device=hidden_states.device) if self.has_base else None
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:  # the "no expert" sentinel
                continue
            token, slot = torch.where(top_k_index == expert)
            x = hidden_states[token]
            gate_up = (x @ self.gate_up_a[expert].T) @ self.gate_up_b[expert].T
            if base_in is not None:
                gate_up = gate_up + base_in[token]
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            weight = top_k_weights[token, slot, None].to(h.dtype)
            if mixed is not None:
                mixed.index_add_(0, token, h * weight)
            own = (h @ self.down_a[expert].T) @ self.down_b[expert].T
            out.index_add_(0, token, (own * weight).to(out.dtype))
        if mixed is not None:
            out += (mixed @ self.down_base.T).to(out.dtype)
        return out


# -- surgery ---------------------------------------------------------------------------
def is_factored(module: nn.Module | None) -> bool:
    return bool(getattr(module, "moekit_factored", False))


def _block_and_name(model: nn.Module, layer_index: int):
    from moekit.arch.adapters import find_family

    family = find_family(model)
    block = getattr(family.decoder_layers(model)[layer_index], family.block)
    return block, family.experts


def install(model: nn.Module, layer_index: int, factored: FactoredExperts) -> None:
    """Put ``factored`` in place of decoder layer ``layer_index``'s experts and record its
    ranks in the config. The replaced module is kept on the ``meta`` device (shapes, no
    memory) for `materialize`."""
    from moekit.arch.storage import to_meta

    block, name = _block_and_name(model, layer_index)
    original = getattr(block, name)
    if is_factored(original):
        raise MoekitError(f"layer {layer_index}'s experts are already factored; decompose each layer once.")
    to_meta(original)
    object.__setattr__(factored, "_moekit_original", original)  # not a submodule: not saved
    setattr(block, name, factored)
    records = dict(getattr(model.config, FACTORED_KEY, None) or {})
    records[str(layer_index)] = factored.ranks()
    setattr(model.config, FACTORED_KEY, dict(sorted(records.items(), key=lambda kv: int(kv[0]))))


def restore_factored(model: nn.Module) -> None:
    """Give a skeleton built from a config the factored experts its ``moekit_factored_experts``
    records (shapes only: the weights are read afterwards)."""
    from moekit.arch.discover import view_layer

    for index, record in (getattr(model.config, FACTORED_KEY, None) or {}).items():
        view = view_layer(model, int(index))
        if view is None or is_factored(view.experts.module):
            continue
        original = view.experts.module
        like = original.down_proj
        factored = FactoredExperts(num_experts=view.num_experts, hidden_size=view.experts.hidden_size,
                                   intermediate_size=view.experts.intermediate_size,
                                   gate_up_ranks=record["gate_up"], down_ranks=record["down"],
                                   base=bool(record["base"]), act_fn=view.experts.activation,
                                   dtype=like.dtype, device=like.device)
        install(model, int(index), factored)


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """Multiply every factored layer's products back into the family's own experts module,
    so the model is an ordinary one of its family (a standard checkpoint: no smaller than
    the original, but loadable anywhere). In place; returns ``model``."""
    from moekit.arch.discover import moe_layers

    for layer in moe_layers(model):
        factored = layer.experts.module
        if not is_factored(factored):
            continue
        original = factored._moekit_original
        for name, value in (("gate_up_proj", factored.gate_up_proj), ("down_proj", factored.down_proj)):
            old = original._parameters[name]
            original._parameters[name] = nn.Parameter(value.detach().to(old.dtype).clone(),
                                                      requires_grad=old.requires_grad)
        block, name = _block_and_name(model, layer.index)
        setattr(block, name, original)
    if hasattr(model.config, FACTORED_KEY):
        delattr(model.config, FACTORED_KEY)
    return model
