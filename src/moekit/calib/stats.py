"""Calibration statistics: per-layer tensors plus what they were computed from.

On disk a folder holds ``stats.safetensors`` (keys ``layer.<index>.<statistic>``) and
``stats.json`` (statistics, token counts, model and data fingerprints, settings), so one
calibration feeds many compressions. Loading for another model or other data is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.data.tokens import data_fingerprint
from moekit.errors import MoekitError

FORMAT_VERSION = 1
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


class ModelDigest:
    """The model fingerprint, built up layer by layer as a streamed pass sees the routers:
    sha256 of the config (minus paths and versions) and of each router's own digest, in
    depth order. Cheap to compute on a huge model, different for any other checkpoint, and
    resumable: the per-router digests (``routers``) are short strings a work folder keeps."""

    def __init__(self, config: Any, routers: list[str] | None = None) -> None:
        kept = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        self.config = json.dumps(kept, sort_keys=True, default=str)
        self.routers = list(routers or [])

    def add_router(self, weight: torch.Tensor) -> None:
        self.routers.append(self.of_router(weight))

    @staticmethod
    def of_router(weight: torch.Tensor) -> str:
        return hashlib.sha256(weight.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()

    def config_fingerprint(self) -> str:
        """The config's part alone: checkable before any weight is read."""
        return hashlib.sha256(self.config.encode()).hexdigest()[:16]

    def hexdigest(self) -> str:
        digest = hashlib.sha256(self.config.encode())
        for router in self.routers:
            digest.update(router.encode())
        return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """`ModelDigest` of a model in memory."""
    from moekit.arch.discover import moe_layers

    digest = ModelDigest(model.config)
    for layer in moe_layers(model):
        digest.add_router(layer.router.weight)
    return digest.hexdigest()


@dataclass
class CalibrationStats:
    """Statistics of each MoE layer (``layers[index][name]``) and their provenance.

    ``tokens[index]`` is the number of tokens that entered layer ``index``.
    """

    layers: dict[int, dict[str, torch.Tensor]]
    tokens: dict[int, int]
    meta: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)  # the folder `load` read them from

    def check_model(self, model: nn.Module) -> None:
        """Refuse statistics computed on another model: the one check, by the fingerprint
        of config and routers calibration records (another model with as many experts
        would otherwise pass silently)."""
        if self.meta.get("model_fingerprint") != model_fingerprint(model):
            where = f" in {self.source}" if self.source is not None else ""
            raise MoekitError(f"the statistics{where} were computed on another model "
                              f"({self.meta.get('model_name', 'unknown')}); calibrate this model (moekit calibrate "
                              "MODEL -o FOLDER) and pass that folder instead.")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.layers[index]

    def hidden_inputs(self, index: int, samples: int) -> torch.Tensor:
        """The first ``samples`` rows [m, H] of layer ``index``'s hidden sample. The sample is
        ordered by a hash of token positions, so its first m rows are exactly the sample a
        calibration asking for m would have kept."""
        return self.layers[index]["hidden_sample"][:samples]

    def only(self, index: int) -> CalibrationStats:
        """The statistics of layer ``index`` alone (what a step editing that layer reads)."""
        return CalibrationStats(layers={index: self.layers[index]}, tokens={index: self.tokens.get(index, 0)},
                                meta=self.meta)

    @property
    def statistics(self) -> list[str]:
        return list(self.meta.get("statistics", []))

    def require(self, names: set[str] | list[str], why: str) -> None:
        """Refuse early when ``names`` were not collected."""
        missing = sorted(set(names) - set(self.statistics))
        if missing:
            raise MoekitError(
                f"{why} needs the statistics {missing}, which this calibration did not collect "
                f"(it has {self.statistics}). Calibrate again with them."
            )

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the statistics folder atomically (never into an existing folder)."""
        from moekit.io.save import atomic_dir

        tensors = {f"layer.{i}.{name}": t.contiguous() for i, stats in self.layers.items() for name, t in stats.items()}
        with atomic_dir(folder) as tmp:
            save_file(tensors, tmp / "stats.safetensors")
            meta = {**self.meta, "format_version": FORMAT_VERSION, "tokens": {str(i): n for i, n in self.tokens.items()}}
            (tmp / "stats.json").write_text(json.dumps(meta, indent=2))
        return Path(folder)

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        *,
        model: nn.Module | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> CalibrationStats:
        """Read a statistics folder; with ``model`` / ``input_ids``, refuse statistics that
        were computed on another model or other data."""
        folder = Path(folder)
        if not (folder / "stats.json").is_file() or not (folder / "stats.safetensors").is_file():
            raise MoekitError(f"{folder} is not a moekit statistics folder (stats.json + stats.safetensors).")
        from moekit.errors import read_json

        meta = read_json(folder / "stats.json", fix="calibrate again to rewrite the folder.")
        if not isinstance(meta, dict):
            raise MoekitError(f"{folder / 'stats.json'} is not a moekit statistics record; calibrate again.")
        if model is not None:
            cls(layers={}, tokens={}, meta=meta, source=folder).check_model(model)
        if input_ids is not None and meta.get("data_fingerprint") != data_fingerprint(input_ids):
            raise MoekitError(f"the statistics in {folder} were computed on other calibration data "
                              f"({meta.get('data_source', 'unknown')}, {meta.get('n_samples')} sequences of "
                              f"{meta.get('seq_len')} tokens, seed {meta.get('seed')}); pass the same data options.")
        from safetensors import SafetensorError

        layers: dict[int, dict[str, torch.Tensor]] = {}
        try:
            stored = load_file(folder / "stats.safetensors")
        except (SafetensorError, OSError) as exc:
            raise MoekitError(f"{folder / 'stats.safetensors'} is not readable ({exc}); calibrate again.") from None
        for key, tensor in stored.items():
            _, index, name = key.split(".", 2)
            layers.setdefault(int(index), {})[name] = tensor
        tokens = {int(i): n for i, n in meta.pop("tokens", {}).items()}
        return cls(layers=dict(sorted(layers.items())), tokens=tokens, meta=meta, source=folder)


def agree_streamed(lent, tokens: torch.Tensor, settings: dict[str, Any], world, what: str) -> None:
    """`agree_inputs` for a streamed calibration or evaluation: the model's config and
    weights index, the token rows and ``settings``."""
    if world is None:
        return
    from moekit.distributed.agree import agree_inputs, weights_index

    agree_inputs({"config": ModelDigest(lent.model.config).config_fingerprint(), "weights": weights_index(lent),
                  "data": data_fingerprint(tokens.reshape(1, -1) if tokens.ndim == 1 else tokens), **settings},
                 world, what)
