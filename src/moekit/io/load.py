"""Loading models: shipped references, local folders and hub ids — safetensors only.

Checkpoints in pickle formats (``pytorch_model.bin``, ``.pt``) are refused: unpickling
runs arbitrary code from the file. ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from moekit.errors import MoekitError, read_json
from moekit.progress import silence_transformers_bars

if TYPE_CHECKING:
    from moekit.io.layered import LayeredModel

REFERENCE_PREFIX = "moekit/"
ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
TINY_PREFIX = "moekit/tiny-"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_HOST = ("huggingface.co", 443)


def default_model() -> str:
    """The model every command uses when none is given: the shipped fine-grained
    reference when present, else a tiny Qwen3-MoE built on the spot."""
    return "moekit/ref-fine" if (ZOO_DIR / "ref-fine" / "config.json").is_file() else "moekit/tiny-qwen3_moe"


def reference_names() -> list[str]:
    """Names ``moekit.load`` resolves without a download."""
    from moekit.zoo.tiny import TINY_CONFIGS

    shipped = sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())
    return [f"{REFERENCE_PREFIX}{name}" for name in shipped] + [f"{TINY_PREFIX}{f}" for f in TINY_CONFIGS]


def load(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM for moekit, in eval mode.

    Args:
        name_or_path: a shipped reference (``moekit/ref-fine``, ``moekit/tiny-mixtral``…),
            a local checkpoint folder, or a hub id. None: `default_model()`.
        dtype: compute dtype; fp32 by default (bf16 matmuls are slow on CPUs).
        trust_remote_code: run the checkpoint's own Python code (off unless asked).

    Raises:
        MoekitError: the folder does not exist or is not an HF checkpoint, holds only
            pickle weights, or the hub cannot be reached for a hub id.
    """
    name = str(name_or_path) if name_or_path is not None else default_model()
    silence_transformers_bars()
    path = check_model(name)
    if path is None:
        return _tiny(name).to(device=device, dtype=dtype)
    from moekit.io.compressed import is_packed
    from moekit.io.layered import read_whole
    from moekit.io.nonuniform import is_nonuniform
    from moekit.methods.dynamic.install import reinstall_saved_policy

    if is_nonuniform(path):
        model = read_whole(path, dtype=dtype).to(device)
    elif is_packed(path):
        model = read_whole(path, dtype=dtype, device=device)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
        except ValueError as exc:
            if "trust_remote_code" in str(exc) and not trust_remote_code:
                raise MoekitError(
                    f"{path} needs its own Python code to load. Pass --trust-remote-code (Python: "
                    f"trust_remote_code=True) only if you trust its source."
                ) from exc
            raise
        model = model.to(device).eval()
    reinstall_saved_policy(model)  # a dynamic routing policy saved with the model routes it again
    return model


def load_config(name_or_path: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """The config of what `load` would load, without reading any weights."""
    from transformers import AutoConfig

    name = str(name_or_path) if name_or_path is not None else default_model()
    path = check_model(name)
    if path is None:
        from moekit.zoo.tiny import tiny_config

        return tiny_config(_tiny_family(name))
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def check_model(name_or_path: str | os.PathLike | None = None) -> Path | None:
    """The check every command runs on a model before anything else, so that the first
    problem reported is the real one (a pickle-only folder is refused as such, not later
    for a missing tokenizer or dtype). Reads config.json and the safetensors headers,
    never the weights. Returns the folder `load` reads, None for a built-in tiny model.

    Raises:
        MoekitError: an unknown shipped name, a missing folder, a folder that is not a
            safetensors checkpoint, or an unreadable config.json or weights file.
    """
    name = str(name_or_path) if name_or_path is not None else default_model()
    if name.startswith(TINY_PREFIX):
        _tiny_family(name)
        return None
    path = _resolve(name)
    _check_checkpoint_dir(path)
    return path


def resolve_folder(name: str) -> Path | None:
    """The local folder ``moekit.load(name)`` reads, checked (None for built-in tiny models)."""
    return check_model(name)




def stored_dtype(name_or_path: str | os.PathLike | None = None) -> torch.dtype:
    """The dtype a checkpoint stores its floating-point weights in (the one holding most of
    them), read from the safetensors headers alone. Models compute in fp32 on CPU; outputs
    are written back in this dtype, so compressing a bf16 model never doubles its size.
    Built-in tiny models are fp32."""
    from moekit.io.checkpoint import Checkpoint

    name = str(name_or_path) if name_or_path is not None else default_model()
    folder = resolve_folder(name)
    if folder is None:
        return torch.float32
    dtype = Checkpoint(folder).floating_dtype()
    if dtype is None:
        raise MoekitError(f"{folder} has no floating-point safetensors weights to read a dtype from.")
    return dtype


def _tiny(name: str) -> PreTrainedModel:
    from moekit.zoo.tiny import tiny_model

    return tiny_model(_tiny_family(name))


def _tiny_family(name: str) -> str:
    from moekit.zoo.tiny import TINY_CONFIGS

    family = name[len(TINY_PREFIX) :]
    if family not in TINY_CONFIGS:
        raise MoekitError(f"no tiny model {name!r}; choose one of: {', '.join(reference_names())}.")
    return family


def _resolve(name: str) -> Path:
    """A local folder for ``name``: shipped reference, existing path, or hub snapshot."""
    if name.startswith(REFERENCE_PREFIX) and not Path(name).exists():
        path = ZOO_DIR / name[len(REFERENCE_PREFIX) :]
        if not (path / "config.json").is_file():
            raise MoekitError(
                f"{name!r} is not shipped with this moekit; available: {', '.join(reference_names())}."
            )
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MoekitError(f"{path} is a file; pass the checkpoint folder that holds config.json.")
        return path
    if _HUB_ID.match(name):
        return _hub_snapshot(name)
    raise MoekitError(f"no such folder: {path}. Pass a local checkpoint folder or a shipped reference.")


def _check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise MoekitError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint folder. "
            f"Pass the folder that save_pretrained wrote."
        )
    _check_config_file(path / "config.json")
    files = [p.name for p in path.iterdir()]
    weights = sorted(path / f for f in files if f.endswith(".safetensors"))
    if weights:
        for file in weights:
            _check_safetensors_header(file)
        _check_weights_fit_config(path, weights)
        return
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise MoekitError(
            f"{path} holds weights only in pickle format ({', '.join(sorted(pickles))}). moekit loads "
            f"safetensors only, because unpickling a file can run arbitrary code. In an environment you "
            f"trust, load it once with transformers and save_pretrained(...) it, which writes safetensors."
        )
    raise MoekitError(f"{path} has config.json but no *.safetensors weights.")


def _check_weights_fit_config(path: Path, weights: list[Path]) -> None:
    """Every tensor's shape is the one config.json gives it (`moekit.io.skeleton`), checked
    before any command computes: transformers would fail with a traceback after a report of
    every mismatch, or build a model the file does not describe. The config and the files'
    sizes and times name the answer: a command checks its model several times."""
    files = [path / "config.json", *weights]
    _weights_fit_config(str(path), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=64)
def _weights_fit_config(path: str, stats: tuple) -> None:
    if "auto_map" in read_json(Path(path) / "config.json", fix=""):
        return  # the checkpoint's own code builds it, which `load` runs only when asked to
    from moekit.io.skeleton import checked_skeleton

    checked_skeleton(Path(path))


def _check_config_file(file: Path) -> None:
    """config.json is a JSON object naming a model type transformers knows (or code of
    its own, which `load` refuses to run unless asked)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = read_json(file, fix="restore the file save_pretrained wrote.")
    if not isinstance(config, dict):
        raise MoekitError(f"{file} does not hold a JSON object of config fields; restore the file save_pretrained wrote.")
    model_type = config.get("model_type")
    if "auto_map" in config:
        return
    if model_type in CONFIG_MAPPING_NAMES:
        _check_aliases(file, config, model_type)
        return
    raise MoekitError(
        f"{file} has no model_type; restore the file save_pretrained wrote." if model_type is None else
        f"{file} has model_type {model_type!r}, which this transformers does not know; upgrade transformers "
        f"or fix the file."
    )


def _check_aliases(file: Path, config: dict, model_type: str) -> None:
    """Two names of one setting (``num_experts`` and ``num_local_experts`` in qwen3_moe: the
    config class's attribute_map) given different values: transformers keeps one and ignores
    the other without a word, so the model built is not the one the file seems to describe."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for alias, name in getattr(CONFIG_MAPPING[model_type], "attribute_map", {}).items():
        if alias in config and name in config and config[alias] != config[name]:
            raise MoekitError(f"{file} gives {alias} {config[alias]} and {name} {config[name]}, two names of one "
                              f"{model_type} setting: transformers would use one and ignore the other. Make them "
                              f"agree with the weights, or drop {alias}.")


def _check_safetensors_header(file: Path) -> None:
    """Headers only: a truncated or garbled file is named here instead of failing with a
    traceback halfway through a load. A command checks its model several times (every
    entry point does) and a big one has hundreds of shards, so an unchanged file is read once."""
    stat = file.stat()
    _readable_safetensors(str(file), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _readable_safetensors(file: str, size: int, mtime_ns: int) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise MoekitError(f"{file} is not a readable safetensors file ({exc}); download or save it again.") from None


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the local cache) the safetensors snapshot of a hub repo."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached: try the network below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    if offline or not _hub_reachable():
        raise MoekitError(
            f"{repo_id!r} is not a local folder, not in the Hugging Face cache, and the hub cannot be "
            f"reached{' (HF_HUB_OFFLINE is set)' if offline else ''}. Download it where there is network "
            f"and pass the local folder instead."
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise MoekitError(f"could not download {repo_id!r} from the hub: {exc}") from exc


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that no network fails in seconds rather than after retries."""
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def open_model(name: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               trust_remote_code: bool = False) -> LayeredModel:
    """A `LayeredModel` for what `moekit.load(name)` names: a checkpoint folder streamed
    from disk, or (for the built-in tiny models, which have no files) the model in memory.
    Each call builds a fresh one: a pass that edits a model changes its skeleton."""
    from moekit.io.layered import LayeredModel

    if name.startswith(TINY_PREFIX):
        return LayeredModel.in_memory(load(name, dtype=dtype, device=device))
    folder = resolve_folder(name)
    _check_checkpoint_dir(folder)
    return LayeredModel.from_checkpoint(folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def quantized_source(name: str, dequantize: bool, stored: torch.dtype) -> list[str]:
    """A quantized (compressed-tensors) input is refused before any work unless
    ``dequantize``: it is read dequantized, so the output would silently store floats.
    With ``dequantize``, the note that the CLI, ``report.json`` and the card carry."""
    from moekit.io.compressed import quantized_input, refuse_quantized

    folder = resolve_folder(name)
    if not dequantize:
        refuse_quantized(name, folder, doing="compressing it",
                         fix="Compress the unquantized model it was made from with a recipe that ends in quantize "
                             "(e.g. --recipe prune-50-w4), or pass --dequantize (Python: dequantize=True) to write "
                             "dequantized weights on purpose.")
        return []
    described = quantized_input(folder)
    if described is None:
        return []
    return [f"the input is a quantized checkpoint ({described}), read dequantized (--dequantize): the output "
            f"stores {str(stored).removeprefix('torch.')} weights, not the input's quantized ones, unless the "
            "recipe quantizes them again; \"before\" counts the input's bytes as stored."]
