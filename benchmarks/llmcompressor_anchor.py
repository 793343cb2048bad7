"""The side-by-side anchor for `benchmarks/quantization.py`: llm-compressor's GPTQ W4A16
(and W3A16: the same arguments at 3 bits) on a reference model, with the same calibration
rows, evaluated by the same code.

llm-compressor pins an older transformers than moekit, so it runs in its own virtual
environment; this script has three stages, each run by the right interpreter:

    .venv/bin/python benchmarks/llmcompressor_anchor.py prepare WORK            # calibration rows (moekit)
    /tmp/llmc/bin/python benchmarks/llmcompressor_anchor.py run WORK [--bits 4]  # llm-compressor's GPTQ
    .venv/bin/python benchmarks/llmcompressor_anchor.py evaluate WORK            # perplexity (moekit)

(``/tmp/llmc``: ``python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor``.)
The results are added to ``benchmarks/results/quantization.json`` under ``anchor``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODEL = "moekit/ref-fine"
ROWS, LENGTH = 32, 256  # what benchmarks/quantization.py calibrates on


def prepare(work: Path, model: str) -> None:
    from safetensors.torch import save_file

    from moekit.data.tokens import calibration_tokens
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.load import check_model

    tokens = calibration_tokens("stdlib:calib", tokenizer_for(model), n_samples=ROWS, seq_len=LENGTH, seed=0)
    work.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": tokens.input_ids.contiguous()}, work / "calibration.safetensors")
    (work / "model.txt").write_text(str(check_model(model)))


def run(work: Path, bits: int) -> None:
    """In llm-compressor's environment: its oneshot GPTQ, every Linear but the head and the
    routers, groups of 128 where they fit (its W4A16 preset's arguments, at ``bits``)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path((work / "model.txt").read_text())
    ids = load_file(work / "calibration.safetensors")["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    def weights(group: int) -> dict:
        return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}

    # the groups moekit's fitted presets choose on ref-fine: 128 for attention, 32 for the
    # experts (96 wide, which 128 does not divide)
    scheme = {"attention": {"targets": ["re:.*self_attn.*"], "weights": weights(128)},
              "experts": {"targets": ["re:.*experts.*"], "weights": weights(32)}}
    recipe = GPTQModifier(config_groups=scheme, ignore=["lm_head", "re:.*mlp.gate$"])
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=LENGTH, num_calibration_samples=ROWS)
    seconds = time.perf_counter() - start
    out = work / f"w{bits}a16"
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    (out / "seconds.txt").write_text(f"{seconds:.1f}")


def evaluate(work: Path, results: Path) -> None:
    from moekit.eval.rows import evaluate_rows as _evaluate
    from moekit.eval.rows import spread_rows
    from moekit.data.tokens import evaluation_stream
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.layered import LayeredModel

    rows = spread_rows(evaluation_stream("stdlib:eval", tokenizer_for(MODEL)).input_ids, 32768, 256)
    anchor = {}
    for out in sorted(work.glob("w*a16")):
        measured = _evaluate(LayeredModel.from_checkpoint(out), rows, 8, False)
        stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        anchor[out.name] = {**measured, "bytes": stored, "seconds": float((out / "seconds.txt").read_text())}
        print(out.name, json.dumps(anchor[out.name]))
    data = json.loads(results.read_text())
    data.setdefault("anchor", {})[MODEL] = {"tool": "llm-compressor GPTQModifier (oneshot)", **anchor}
    results.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["prepare", "run", "evaluate"])
    parser.add_argument("work", type=Path)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "quantization.json")
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(args.work, MODEL)
    elif args.stage == "run":
        run(args.work, args.bits)
    else:
        evaluate(args.work, args.results)
    sys.exit(0)


if __name__ == "__main__":
    main()
