"""Quantized checkpoints in compressed-tensors' ``pack-quantized`` format.

This is what llm-compressor writes and what vLLM, SGLang and transformers (with the
``compressed-tensors`` package) load: every quantized Linear ``X`` is stored as
``X.weight_packed`` (int32, b-bit integers packed densely), ``X.weight_scale``,
``X.weight_shape`` (and ``X.weight_zero_point`` when asymmetric), and config.json's
``quantization_config`` lists ``config_groups``: a scheme (bits, group size, symmetry)
and the module names it applies to. Routed experts are written per expert
(``...experts.7.gate_proj.weight_packed``), the layout transformers' own reverse weight
conversion gives fused experts, so the names are exactly those ``save_pretrained``
writes for the unquantized model.

While a layer is being compressed, a quantize step records the integers and scales of
what it quantized in the model's `Ledger`, keyed by parameter name in the model's own
(fused) layout; `ShardWriter` packs them when it writes the layer, passing integers,
scales and bit widths through the same reverse conversion as the weights, so moekit
never spells a family's checkpoint names. Which scheme each written module got, and which
fused module of the model (``model.layers.0.mlp.experts``) each per-expert module came
from, is kept beside the layer's shard (``layer-NNNNN.quant.json``), so a resumed run
builds the same config.

What plain transformers loads (tested on every family the quantize step supports, 5.23 to 5.25):

- **At the checkpoint's dtype** (``from_pretrained``'s default, ``dtype="auto"``), the
  logits of `moekit.load(folder, dtype=that dtype)`, exactly: both decompress a Linear's
  integers times its scales in that dtype, and fused experts in their scales' dtype,
  which is the checkpoint's.
- **At another dtype**, not (5.25): transformers decompresses Linears in the dtype it is asked
  for, but keeps fused experts in their scales' dtype, whatever ``dtype=`` says (a
  float32 load of a bf16 checkpoint computes with bf16 experts). Storing scales in
  float32 would only move the mismatch: a bf16 load would then hold the experts in
  float32 (twice their memory).
- **Without a warning**: a layer's routed experts have one ``re:`` target that alternates
  the fused module's name and the per-expert names (``model.layers.N.mlp.experts`` or
  ``model.layers.N.mlp.experts.M.gate_proj`` ...).
  Checkpoints, vLLM and compressed-tensors see one Linear per expert and projection;
  transformers 5 holds a layer's experts as one module of fused tensors, and
  compressed-tensors warns (``Could not match ...``) about every target that names no
  module. transformers finds the experts' scheme by a ``re:`` target that mentions
  ``experts`` (``get_experts_scheme``) and decompresses them while loading; matching the
  fused module, which is not a Linear, changes nothing else (compressed-tensors 0.18 on
  skips it; 0.16 and 0.17 refuse to load: hence moekit's ``compressed-tensors>=0.18``).
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moekit.arch.layout import QUANT_NOTE_KEY
from moekit.methods.quantize.scheme import QuantScheme


@dataclass
class QuantizedParam:
    """One model parameter's quantization, in the parameter's own layout.

    Shapes for a Linear weight [out, in]: ``values`` int8 [out, in], ``scale`` [out, G],
    ``zero_point`` int8 [out, G] or None, ``bits`` int8 [out, 1]. A fused experts tensor
    [E, out, in] has the same with a leading E (each expert may have its own bits).
    """

    values: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: torch.Tensor
    group_size: int | None
    symmetric: bool


@dataclass
class Ledger:
    """What has been quantized in one model and not yet written."""

    scale_dtype: torch.dtype = torch.float32
    params: dict[str, QuantizedParam] = field(default_factory=dict)

    def discard(self, prefix: str) -> None:
        """Forget what was recorded under ``prefix`` (a pass that does not write)."""
        for name in [n for n in self.params if n.startswith(prefix)]:
            del self.params[name]


_LEDGERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ledger(model: nn.Module, *, scale_dtype: torch.dtype | None = None) -> Ledger:
    """The model's ledger (made on first use; ``scale_dtype`` sets the dtype scales are
    saved in, the output checkpoint's)."""
    found = _LEDGERS.get(model)
    if found is None:
        found = _LEDGERS[model] = Ledger()
    if scale_dtype is not None:
        found.scale_dtype = scale_dtype
    return found


def stacked(weights: list) -> QuantizedParam:
    """The `QuantizedParam` of a fused experts tensor from each expert's `QuantizedWeight`
    (all with the same group size and symmetry; bits may differ)."""
    first = weights[0].scheme
    zero = None if first.symmetric else torch.stack([w.zero_point for w in weights])
    bits = torch.stack([torch.full((w.values.shape[0], 1), w.scheme.bits, dtype=torch.int8) for w in weights])
    return QuantizedParam(torch.stack([w.values for w in weights]), torch.stack([w.scale for w in weights]), zero,
                          bits, first.group_size, first.symmetric)


def single(weight) -> QuantizedParam:
    """The `QuantizedParam` of a Linear's weight from its `QuantizedWeight`."""
    bits = torch.full((weight.values.shape[0], 1), weight.scheme.bits, dtype=torch.int8)
    return QuantizedParam(weight.values, weight.scale, weight.zero_point, bits, weight.scheme.group_size,
                          weight.scheme.symmetric)


def pack_state(model: nn.Module, state: dict[str, torch.Tensor], names: list[str],
               scale_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, list[str]]]:
    """Replace, in ``state`` (checkpoint names, after the reverse conversion), every weight
    that came from one of the ledger's parameters ``names`` by its packed tensors. Returns
    the new state, {module name: scheme key} (see `scheme_key`) and {fused module of the
    model: the checkpoint modules it was written as} (routed experts)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from transformers.core_model_loading import revert_weight_conversion

    book = ledger(model)
    out = dict(state)
    schemes: dict[str, str] = {}
    fused: dict[str, list[str]] = {}
    for name in names:
        entry = book.params.pop(name)
        owner = name.rsplit(".", 1)[0]

        def reverted(value: torch.Tensor | None, name: str = name) -> dict[str, torch.Tensor]:
            return {} if value is None else revert_weight_conversion(model, {name: value})

        values, scales, bits, zeros = (reverted(t) for t in (entry.values, entry.scale, entry.bits, entry.zero_point))
        for key, ints in values.items():
            if not key.endswith(".weight") or key not in out:
                raise ValueError(f"quantized {key} has no weight of that name in the checkpoint layout")
            module = key[: -len(".weight")]
            b = int(bits[key].reshape(-1)[0])
            del out[key]
            out[f"{module}.weight_packed"] = pack_to_int32(ints.contiguous(), b)
            out[f"{module}.weight_scale"] = scales[key].to(scale_dtype).contiguous()
            out[f"{module}.weight_shape"] = torch.tensor(ints.shape)
            if not entry.symmetric:
                out[f"{module}.weight_zero_point"] = pack_to_int32(zeros[key].contiguous(), b, packed_dim=0).contiguous()
            schemes[module] = scheme_key(QuantScheme(b, entry.group_size, entry.symmetric))
            if module != owner:
                fused.setdefault(owner, []).append(module)
    return out, schemes, fused


def scheme_key(scheme: QuantScheme) -> str:
    return f"{scheme.bits}/{scheme.group_size or 'channel'}/{'sym' if scheme.symmetric else 'asym'}"


def scheme_of(key: str) -> QuantScheme:
    bits, group, symmetry = key.split("/")
    return QuantScheme(int(bits), None if group == "channel" else int(group), symmetry == "sym")


def sidecar(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".safetensors") + ".quant.json")


def write_sidecar(shard: Path, schemes: dict[str, str], fused: dict[str, list[str]]) -> None:
    path = sidecar(shard)
    if schemes:
        path.write_text(json.dumps({"schemes": schemes, "fused": fused}, indent=1, sort_keys=True))
    elif path.exists():
        path.unlink()


def read_schemes(shards: list[Path]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({module: scheme key}, {fused module: its checkpoint modules}) over the shards'
    sidecars."""
    schemes: dict[str, str] = {}
    fused: dict[str, list[str]] = {}
    for shard in shards:
        if sidecar(shard).exists():
            found = json.loads(sidecar(shard).read_text())
            if "schemes" not in found:  # written before fused modules were recorded
                found = {"schemes": found, "fused": {}}
            schemes.update(found["schemes"])
            fused.update(found["fused"])
    return schemes, fused


_INDEXED = re.compile(r"(layers|experts)\.\d+\.")


def _pattern(module: str) -> str:
    """The module's name with layer and expert numbers generalised, as a regex body."""
    out, start = "", 0
    for match in _INDEXED.finditer(module):
        out += re.escape(module[start:match.start()]) + match.group(1) + r"\.\d+\."
        start = match.end()
    return out + re.escape(module[start:])


def mixed_experts(schemes: dict[str, str], fused: dict[str, list[str]]) -> bool:
    """Whether routed experts (modules written from a fused one) have more than one scheme:
    transformers and vLLM would decompress them all with one (see the module docstring)."""
    return len({schemes[m] for modules in fused.values() for m in modules}) > 1


def quantization_config(schemes: dict[str, str], fused: dict[str, list[str]]) -> dict:
    """config.json's ``quantization_config`` for {module: scheme key} (``fused``: see
    `pack_state`): one config group per scheme. A group's targets generalise layer and
    expert numbers when that matches no module of another scheme (so a uniform model needs
    a handful of regexes); otherwise they list its modules by name. Uniform routed experts
    get one target per fused module that names it and its per-expert modules."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    patterns: dict[str, set[str]] = {}
    for module, key in schemes.items():
        patterns.setdefault(_pattern(module), set()).add(key)
    mixed = mixed_experts(schemes, fused)
    owner_of = {} if mixed else {m: owner for owner, modules in fused.items() for m in modules}
    by_scheme: dict[str, list[str]] = {}
    experts: dict[str, dict[str, set[str]]] = {}  # scheme → fused module pattern → per-expert patterns
    for module, key in sorted(schemes.items()):
        pattern = _pattern(module)
        if module in owner_of:
            experts.setdefault(key, {}).setdefault(_pattern(owner_of[module]), set()).add(pattern)
            continue
        target = f"re:^{pattern}$" if len(patterns[pattern]) == 1 else module
        if target not in by_scheme.setdefault(key, []):
            by_scheme[key].append(target)
    for key, owners in experts.items():
        by_scheme.setdefault(key, []).extend(f"re:^(?:{'|'.join([owner, *sorted(parts)])})$"
                                             for owner, parts in sorted(owners.items()))
    # transformers decompresses all fused experts with the first group whose regex targets
    # mention experts: put the experts' scheme (the most common one when mixed) first
    routed = [m for modules in fused.values() for m in modules]
    order = sorted(by_scheme, key=lambda k: -sum(1 for m in routed if schemes[m] == k))
    groups = {f"group_{n}": QuantizationScheme(targets=by_scheme[key], weights=scheme_of(key).args(),
                                               format="pack-quantized")
              for n, key in enumerate(order)}
    config = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                                ignore=["lm_head"])
    out = {"quant_method": "compressed-tensors", **config.model_dump(exclude_none=True)}
    if mixed:
        out[QUANT_NOTE_KEY] = ("routed experts have different bit widths, which transformers and vLLM decompress with "
                               "one scheme (wrongly): the weights are moekit-model.safetensors so that they refuse "
                               "the folder; load it with moekit.load")
    return out


# -- reading ------------------------------------------------------------------------------
_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


@dataclass(frozen=True)
class PackedModule:
    """One pack-quantized Linear of a checkpoint: its scheme (a compressed-tensors
    ``QuantizationScheme``) and the checkpoint names of its parts."""

    scheme: object
    parts: dict[str, str]


def packed_modules(folder: Path, names) -> dict[str, PackedModule]:
    """{module: `PackedModule`} for a compressed-tensors ``pack-quantized`` checkpoint in
    ``folder`` whose tensors are ``names`` (empty for any other checkpoint)."""
    config = _compressed_tensors_config(folder)
    if config is None:
        return {}
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name

    from moekit.errors import MoekitError

    parsed = QuantizationConfig.model_validate({k: v for k, v in config.items() if k != QUANT_NOTE_KEY})
    modules: dict[str, PackedModule] = {}
    names = set(names)
    for name in sorted(n for n in names if n.endswith(".weight_packed")):
        module = name.removesuffix(".weight_packed")
        scheme = next((group for group in parsed.config_groups.values()
                       if any(match_name(module, target) for target in group.targets)), None)
        if scheme is None or (scheme.format or parsed.format) != "pack-quantized":
            raise MoekitError(f"{folder}: {module} is packed but no pack-quantized config group of config.json "
                              "targets it; the quantization_config does not describe these weights.")
        parts = {part: f"{module}.{part}" for part in _PARTS if f"{module}.{part}" in names}
        modules[module] = PackedModule(scheme, parts)
    return modules


def unpacked_shape(module: PackedModule, shapes: dict[str, tuple[int, ...]], read) -> tuple[int, int]:
    """[out, in] of a packed Linear: from its scales for grouped schemes, else its stored
    ``weight_shape`` (``read(name)`` reads one small tensor)."""
    weights = module.scheme.weights
    out = shapes[module.parts["weight_packed"]][0]
    if weights.strategy == "group":
        return out, shapes[module.parts["weight_scale"]][-1] * weights.group_size
    return tuple(int(v) for v in read(module.parts["weight_shape"]).tolist())


def decompress(module: PackedModule, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight [out, in] (in the scale's dtype) from the module's parts
    ``tensors`` ({part name: tensor}), with compressed-tensors' own decompressor."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    state = {part: tensors[name] for part, name in module.parts.items()}
    return PackedQuantizationCompressor.decompress(state, module.scheme)["weight"]


def _compressed_tensors_config(folder: Path) -> dict | None:
    """config.json's ``quantization_config`` when it is compressed-tensors', else None."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text()).get("quantization_config") or {}
    return config if config.get("quant_method") == "compressed-tensors" else None


def is_packed(folder: Path) -> bool:
    """Whether ``folder`` holds a compressed-tensors checkpoint."""
    return _compressed_tensors_config(folder) is not None


def quantized_input(folder: Path | None) -> str | None:
    """What a compressed-tensors checkpoint in ``folder`` holds, for messages
    (``compressed-tensors, 4-bit weights``); None for any other checkpoint (or no folder)."""
    config = _compressed_tensors_config(folder) if folder is not None else None
    if config is None:
        return None
    bits = sorted({(group.get("weights") or {}).get("num_bits") for group in
                   (config.get("config_groups") or {}).values()} - {None})
    return f"compressed-tensors, {'/'.join(map(str, bits)) or '?'}-bit weights"


def refuse_quantized(name: str, folder: Path | None, *, doing: str, fix: str) -> None:
    """The one rule for commands that write weights read from a checkpoint (compress,
    upcycle, split, combine, train --init): a quantized input is refused before any work,
    because its weights are read dequantized and would be written as floats — the output
    silently loses the quantization and grows several times. ``doing`` says what the
    command would do ("compressing it"), ``fix`` what to do instead."""
    described = quantized_input(folder)
    if described is not None:
        from moekit.errors import MoekitError

        raise MoekitError(f"{name} is a quantized checkpoint ({described}): {doing} would write its weights "
                          f"dequantized, as floats several times larger, without the quantization. {fix}")
