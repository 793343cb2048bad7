"""What a layer-streamed run must hold, from a model's config alone: the memory table of issue 12.

Each config in benchmarks/configs/ (the hub's config.json; sources in configs/README.md) and
each synthetic benchmark preset is built on the meta device with transformers' own
``from_config`` (shapes, no storage), and its parameters are summed per decoder layer, so
no parameter formula is written by hand here. Per model: total parameters and their size
in bf16; the largest decoder layer's parameters, in fp32 (moekit's compute dtype on CPU)
and bf16 (on GPU); the embeddings and head (held for the whole run); and the hidden state
of one calibration token (hidden_size x 4 bytes, fp32), which is multiplied by
rows x sequence length.

    python benchmarks/memory_table.py          # prints the table, writes results/memory_table.json
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synthetic  # noqa: E402

GB = 1e9


def config_from_json(path: Path) -> PretrainedConfig:
    """The published config as transformers' native class for its model_type.

    auto_map (DeepSeek's remote code) is dropped: transformers 5 has the family built in.
    quantization_config is dropped: DeepSeek-V3 ships FP8 weights, but the table is about
    the dtypes moekit computes in, and building a quantized skeleton is not needed for that.
    """
    data = json.loads(path.read_text())
    data.pop("auto_map", None)
    data.pop("quantization_config", None)
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def memory_row(name: str, config: PretrainedConfig) -> dict:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layers = [_numel(layer) for layer in model.model.layers]
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    # A tied head is the embedding itself: count it once, as num_parameters does.
    head = 0 if head is None or head.weight is model.get_input_embeddings().weight else head.weight.numel()
    total = model.num_parameters()
    rest = total - sum(layers) - embed - head  # final norm and any other top-level parameters
    largest = max(layers)
    return {
        "model": name, "model_type": config.model_type, "layers": len(layers), "hidden": config.hidden_size,
        "total_params": total, "bf16_bytes": 2 * total,
        "largest_layer_params": largest, "largest_layer_index": layers.index(largest),
        "largest_layer_fp32_bytes": 4 * largest, "largest_layer_bf16_bytes": 2 * largest,
        "smallest_layer_params": min(layers),
        "embed_head_params": embed + head, "embed_head_fp32_bytes": 4 * (embed + head),
        "embed_head_bf16_bytes": 2 * (embed + head), "other_params": rest,
        "hidden_bytes_per_token": 4 * config.hidden_size,
    }


RUNTIME_BYTES = 0.5 * GB  # Python, torch and transformers themselves (measured: ~0.45 GB RSS before work)


def estimated_peak(row: dict, *, rows: int = 64, seq_len: int = 256) -> dict:
    """The memory formula of docs/bigger-than-memory.md for a streamed compress with the
    default calibration (``rows`` x ``seq_len`` tokens, one phase): on the CPU in fp32, the
    embeddings and head, the largest layer twice (the layer, and its copy while it is read
    and written), the rows' hidden states and the runtime; on a GPU in bf16, the layer
    twice and one batch."""
    hidden = rows * seq_len * row["hidden_bytes_per_token"]
    cpu = row["embed_head_fp32_bytes"] + 2 * row["largest_layer_fp32_bytes"] + hidden + RUNTIME_BYTES
    gpu = row["embed_head_bf16_bytes"] + 2 * row["largest_layer_bf16_bytes"]
    return {"cpu_fp32_bytes": cpu, "gpu_bf16_bytes": gpu, "hidden_states_bytes": hidden}


def rows() -> list[dict]:
    out = [memory_row(path.stem, config_from_json(path)) for path in sorted(HERE.glob("configs/*.json"))]
    for preset, sizes in synthetic.PRESETS.items():
        out.append(memory_row(f"synthetic {preset}", synthetic.make_config("qwen3_moe", **sizes)))
    return out


def render(table: list[dict]) -> str:
    def gb(x: float) -> str:
        return f"{x / GB:.2f}" if x < 10 * GB else f"{x / GB:.0f}"

    lines = ["| model | params (B) | bf16 size (GB) | layers | largest layer (M params) | largest layer fp32 / bf16 "
             "(GB) | embeddings + head fp32 / bf16 (GB) | hidden state per calibration token (KiB, fp32) "
             "| compress needs, CPU fp32: RAM (GB) | GPU bf16: GPU memory (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        peak = estimated_peak(r)
        lines.append(f"| {r['model']} | {r['total_params'] / 1e9:.1f} | {gb(r['bf16_bytes'])} | {r['layers']} | "
                     f"{r['largest_layer_params'] / 1e6:.0f} | {gb(r['largest_layer_fp32_bytes'])} / "
                     f"{gb(r['largest_layer_bf16_bytes'])} | {gb(r['embed_head_fp32_bytes'])} / "
                     f"{gb(r['embed_head_bf16_bytes'])} | {r['hidden_bytes_per_token'] / 1024:.0f} | "
                     f"{gb(peak['cpu_fp32_bytes'])} | {gb(peak['gpu_bf16_bytes'])} |")
    return "\n".join(lines)


def main() -> None:
    table = rows()
    for row in table:
        row["estimated_compress_peak"] = estimated_peak(row)
    result = {"machine": f"{platform.machine()}, config-only (meta device)", "date": str(date.today()),
              "transformers": __import__("transformers").__version__, "rows": table}
    (HERE / "results" / "memory_table.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(table))
    print(f"\nFrom the configs alone (transformers {result['transformers']}, meta device); {result['date']}. "
          "GB = 1e9 bytes.")


if __name__ == "__main__":
    main()
