"""Writing an MoE built from a dense checkpoint, one decoder layer at a time.

Upcycling and splitting differ only in how a layer's MLP becomes experts and a router;
everything else is shared here: the MoE skeleton on the meta device, each layer
materialised from the dense layer's tensors (attention and norms copied), written as its
own shard and released, then the embeddings, norm and head, the tokenizer, and a report
beside the checkpoint. The output folder appears only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.errors import MoekitError

# (layer index, (gate, up, down) of its dense MLP) -> (gate_up [E, 2I', H], down [E, H, I'], router [E, H], report)
ExpertsOf = Callable[[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]]


@dataclass
class DenseSource:
    """A dense checkpoint to build from, checked; and where the result goes."""

    folder: Path
    out: Path
    config: Any

    @classmethod
    def open(cls, dense: str | os.PathLike, out_dir: str | os.PathLike) -> DenseSource:
        from transformers import AutoConfig

        from moekit.io.load import check_model
        from moekit.io.outputs import check_output

        out = check_output(out_dir)  # before any weight is read
        folder = check_model(str(dense))
        if folder is None:
            raise MoekitError(f"{dense} is not a checkpoint folder; moekit builds MoEs from a dense model's "
                              "safetensors.")
        refuse_built_from_quantized(str(dense), folder)
        return cls(folder, out, AutoConfig.from_pretrained(folder))


def refuse_built_from_quantized(name: str, folder: Path | None) -> None:
    """upcycle, split and combine read a dense checkpoint's weights as floats: a quantized
    one is refused before any work (`moekit.io.compressed.refuse_quantized`)."""
    from moekit.io.compressed import refuse_quantized

    refuse_quantized(name, folder, doing="building an MoE from it",
                     fix="Build from the unquantized model, then quantize the MoE with "
                         "`moekit compress OUT --recipe w4a16`.")


def write_moe(source: DenseSource, config, experts_of: ExpertsOf, *, report: dict, name: str,
              shared: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
              measure: Callable[[Path], dict] | None = None,
              shared_expert: Callable[[int, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None
              ) -> dict:
    """Write the MoE of ``config`` into ``source.out``: layer by layer, its experts and router
    from ``experts_of``; returns ``report`` completed (also written to ``name``).
    ``shared`` maps the dense tensors copied as they are (attention, norms, embeddings,
    head; checkpoint names) to the ones to write (`combine` averages several models').
    ``measure(folder)`` runs on the finished checkpoint before the output folder appears;
    what it returns joins the report. ``shared_expert(index, mlp)`` gives the (gate, up,
    down) of the layer's shared expert where the family has one."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from moekit.arch.storage import to_meta
    from moekit.io.checkpoint import Checkpoint
    from moekit.io.save import atomic_dir
    from moekit.io.shards import OUTER, ShardWriter

    checkpoint = Checkpoint(source.folder)
    stored = checkpoint.floating_dtype() or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    prefix = f"{model.base_model_prefix}.layers"
    layers = model.get_submodule(prefix)
    per_layer = {}
    with atomic_dir(source.out) as tmp:
        work = tmp / ".layers"
        writer = ShardWriter(work, model, dtype=stored)
        for index, layer in enumerate(layers):
            dense = checkpoint.read(checkpoint.names(f"{prefix}.{index}."))
            mlp = dense_mlp(dense, f"{prefix}.{index}.")
            gate_up, down, router, layer_report = experts_of(index, mlp)
            fill_layer(layer, shared(dense) if shared else dense, f"{prefix}.{index}.", gate_up=gate_up, down=down,
                       router=router, shared_expert=shared_expert(index, mlp) if shared_expert else None)
            writer.write_layer(index, f"{prefix}.{index}.")
            to_meta(layer)
            if layer_report:
                per_layer[str(index)] = layer_report
        outer = checkpoint.read([n for n in checkpoint.names() if not n.startswith(f"{prefix}.")])
        fill_outer(model, shared(outer) if shared else outer, prefix)
        writer.write_outer(f"{prefix}.")
        writer.finish(tmp, [*range(len(layers)), OUTER])
        for file in source.folder.iterdir():
            if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
                shutil.copyfile(file, tmp / file.name)
        shutil.rmtree(work)
        report = {**report, "out": str(source.out), "family": model.config.model_type,
                  **({"layers": per_layer} if per_layer else {}), **(measure(tmp) if measure else {})}
        (tmp / name).write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def streamed_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """The logits [B, S, V] of the checkpoint in ``folder`` on ``ids``, one decoder layer in
    memory at a time (to compare a built MoE with its dense source at any size)."""
    from moekit.calib.runner import LayerStreamer
    from moekit.io.layered import LayeredModel

    lent = LayeredModel.from_checkpoint(folder)
    streamer = LayerStreamer(lent, ids, batch_size=ids.shape[0])
    hidden = streamer.capture()
    for index, layer in streamer.layers():
        streamer.forward(index, layer, hidden)
    return streamer.logits(hidden, 0).float()


def step_zero_difference(dense: Path, moe: Path, vocab_size: int, *, rows: int = 2, length: int = 32,
                         seed: int = 0) -> float:
    """max |logit(MoE) − logit(dense)| on seeded random token rows: what a method that
    preserves the dense function leaves of it at step 0."""
    ids = torch.randint(0, vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))
    return float((streamed_logits(moe, ids) - streamed_logits(dense, ids)).abs().max())


def dense_mlp(dense: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [I, H], up [I, H], down [H, I]) in fp32 from a dense layer's tensors."""
    names = [f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    missing = [n for n in names if n not in dense]
    if missing:
        raise MoekitError(f"{missing[0]} is not in the checkpoint; moekit builds experts from a gated MLP "
                          "(gate, up, down).")
    return tuple(dense[n].float() for n in names)


@torch.no_grad()
def fill_layer(layer, dense: dict[str, torch.Tensor], prefix: str, *, gate_up: torch.Tensor, down: torch.Tensor,
               router: torch.Tensor, shared_expert: tuple[torch.Tensor, ...] | None = None) -> None:
    """Materialise the MoE decoder ``layer``: attention and norms from the dense layer's
    tensors (checkpoint names, the same in both families), experts, router and the shared
    expert's (gate [I, H], up [I, H], down [H, I]) as given."""
    layer.to_empty(device="cpu")
    for buffer in layer.buffers():  # to_empty leaves garbage; a layer's only buffer is a selection bias, 0 at first
        buffer.zero_()
    own = dict(layer.named_parameters())
    for name, tensor in dense.items():
        local = name.removeprefix(prefix)
        if local.startswith("mlp."):
            continue
        if local not in own:
            raise MoekitError(f"{name} has no place in the MoE layer; the dense family's layer differs.")
        own[local].copy_(tensor)
    block = layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe
    block.experts.gate_up_proj.copy_(gate_up)
    block.experts.down_proj.copy_(down)
    block.gate.weight.copy_(router)
    if shared_expert is not None:
        for proj, tensor in zip(("gate_proj", "up_proj", "down_proj"), shared_expert, strict=True):
            getattr(block.shared_experts, proj).weight.copy_(tensor)


@torch.no_grad()
def fill_outer(model, dense: dict[str, torch.Tensor], prefix: str) -> None:
    """Embeddings, final norm, head: the same names in both."""
    for module_name, module in model.named_modules():
        if module_name.startswith(prefix) or module_name == prefix:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if full in dense:
                module._parameters[name] = torch.nn.Parameter(dense[full].clone(), requires_grad=False)
    model.tie_weights()


class MlpInputs:
    """A dense model streaming its calibration rows one decoder layer at a time, in step
    with the writer: `at(index)` gives what enters layer ``index``'s MLP [N, H] and moves the
    stream past that layer (split fits routers on it, combine takes its mean direction)."""

    def __init__(self, folder: Path, ids: torch.Tensor) -> None:
        from moekit.calib.runner import LayerStreamer
        from moekit.io.layered import LayeredModel

        self.lent = LayeredModel.from_checkpoint(folder)
        self.streamer = LayerStreamer(self.lent, ids)
        self.hidden = self.streamer.capture()

    def at(self, index: int) -> torch.Tensor:
        from moekit.arch.layer import watching

        layer = self.lent.layer(index)
        kept: list[torch.Tensor] = []
        try:
            self.streamer.forward(index, layer, self.hidden,
                                  observe=watching(layer.mlp, lambda x: kept.append(x.reshape(-1, x.shape[-1]))))
        finally:
            self.lent.release(index)
        return torch.cat(kept).float()
