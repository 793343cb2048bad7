"""What a compress's output says about itself: the model card (README.md) and the sentence
the CLI prints — sizes before and after, experts per token, and who can load the output
with what result (`plain_transformers`, `who_loads`)."""

from __future__ import annotations

from pathlib import Path

import yaml


# What plain transformers (`AutoModelForCausalLM.from_pretrained`, no moekit imported) makes of
# each output, tested on every format in a process that never imports moekit
# (tests/test_who_loads.py): "same" — it loads it and computes what `moekit.load` computes;
# "ignores_routing_policy" — it loads the weights but routes every token to all top-k
# experts, so its results differ; "fails" — it raises (moekit's own formats are written
# without model.safetensors; mixed-width experts fail transformers' weight conversion).
def plain_transformers(format: str, *, routing_policy: bool) -> str:
    if format in ("moekit-nonuniform", "moekit-factored", "compressed-tensors-mixed"):
        return "fails"
    return "ignores_routing_policy" if routing_policy else "same"


def who_loads(report: dict) -> str:
    """Who can load the output and with what result: the card's and the CLI's sentence."""
    fmt, plain = report["format"], report.get("plain_transformers", "same")
    if fmt == "compressed-tensors":
        what = ("Weights are quantized in the compressed-tensors `pack-quantized` format (see `quantization_config` "
                "in config.json), the format vLLM and SGLang serve (not tested with moekit's output). "
                "`transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it without moekit when the "
                "`compressed-tensors` package is installed")
    elif fmt == "compressed-tensors-mixed":
        return ("Weights are quantized in the compressed-tensors `pack-quantized` format, with routed experts of "
                "different bit widths. transformers and vLLM decompress all routed experts with one scheme, so they "
                "cannot load this folder correctly; its weights are named `moekit-model.safetensors` so that "
                "`from_pretrained` fails rather than load it wrong. Load it with `moekit.load(folder)`.")
    elif fmt == "standard":
        what = ("This is a standard checkpoint: `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads "
                "it without moekit")
    else:
        return ("Layers differ in a way a standard transformers config cannot express (different numbers of "
                "experts or top-k per layer, MoE sublayers removed, or experts stored as low-rank factors; see "
                "config.json's `moekit_*` keys). This folder is in moekit's own format (`moekit.json`, "
                "`moekit-model.safetensors`, no `model.safetensors`, so `from_pretrained` fails rather than load it "
                "wrong): load it with `moekit.load(folder)`."
                + (" `moekit compress --materialize` writes a standard checkpoint instead." if fmt == "moekit-factored"
                   else ""))
    if plain == "ignores_routing_policy":
        return (what + ", but transformers ignores the routing policy (config.json's `moekit_routing_policy`): it "
                "routes every token to all top-k experts, as the model before the policy did, so its results differ "
                "from this model's. `moekit.load(folder)` applies the policy (and `moekit eval` counts the experts "
                "it computes).")
    return what + " and computes what `moekit.load(folder)` computes."


def model_card(report: dict) -> str:
    """A README.md for the output folder: what was done and what it cost."""
    before, after = report["before"], report["after"]
    # one count per layer: a global budget keeps a different number in each
    layers = sorted(before["experts_per_layer"].keys() | after["experts_per_layer"].keys(), key=int)
    lines = [
        f"# {Path(report['model']).name} compressed by moekit",
        "",
        f"Source model: `{report['model']}`. Recipe (also in `recipe.yaml`):",
        "",
        "```yaml",
        yaml.safe_dump(report["recipe"], sort_keys=False).rstrip(),  # as `Recipe.to_yaml` writes it
        "```",
        "",
        f"Calibration: {report['data_shape'][0]} sequences of {report['data_shape'][1]} tokens from "
        f"`{report['data_source']}` (fingerprint `{report['data_fingerprint']}`).",
        *(f"Note: {note}" for note in report.get("notes", [])),
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| parameters | {before['total_params']:,} | {after['total_params']:,} |",
        f"| active parameters per token | {before['active_params']:,} | {active_after(after)} |",
        f"| experts per token (mean over MoE layers) | {before['experts_per_token']:g} | "
        f"{experts_per_token_after(after)} |",
        f"| bytes as stored (output: {stored_as(report)}) | {before['bytes']:,} | {after['bytes']:,} |",
        f"| experts per MoE layer (layers {', '.join(map(str, layers))}) | "
        f"{', '.join(str(before['experts_per_layer'].get(i, '-')) for i in layers)} | "
        f"{', '.join(str(after['experts_per_layer'].get(i, '-')) for i in layers)} |",
    ]
    if "eval" in before:
        lines += [
            f"| perplexity ({eval_tokens(before['eval'])}) | {before['eval']['perplexity']:.3f} | "
            f"{after['eval']['perplexity']:.3f} |",
            f"| next-token accuracy | {before['eval']['accuracy']:.2%} | {after['eval']['accuracy']:.2%} |",
        ]
    removed = before["experts_per_layer"] != after["experts_per_layer"]
    lines += ["", *(["Experts kept in each layer (original ids) are listed in `report.json`.", ""] if removed else []),
              who_loads(report)]
    return "\n".join(lines) + "\n"


def active_after(after: dict) -> str:
    """The "after" active parameters per token: with a routing policy, at the full top-k and
    at the mean the policy kept on the calibration tokens."""
    if "routing_policy" not in after:
        return f"{after['active_params']:,}"
    mean = after.get("active_params_with_policy")
    return f"{after['active_params']:,} at the full top-k; " + (
        f"{mean:,} on average with the routing policy" if mean is not None else "fewer with the routing policy")


def experts_per_token_after(after: dict) -> str:
    if "routing_policy" not in after:
        return f"{after['experts_per_token']:g}"
    if after["experts_per_token"] is None:
        return "decided per token by the routing policy (its parameter was given: not measured)"
    return f"{after['experts_per_token']:g} (routing policy; mean on the calibration tokens)"


def eval_tokens(scores: dict) -> str:
    """What an evaluation scored, in words: each row's first token has nothing before it to
    be predicted from, so 128 rows of 256 tokens score 32,640 predictions."""
    if "rows" not in scores:  # a report.json written before rows were recorded
        return f"{scores['tokens']:,} tokens predicted"
    return f"{scores['tokens']:,} tokens predicted: {scores['rows']} rows of {scores['row_length']}"


def stored_as(report: dict) -> str:
    """What the output's weights are stored as, in words: its dtype, or for a quantized output
    the packed bit widths first (``4-bit Linear and expert weights, the rest bfloat16``)."""
    quantize = [step for step in report["recipe"]["steps"] if step["type"] == "quantize"]
    if not quantize:
        return report["dtype"]
    step = quantize[-1]
    bits = {"linear": f"{step['bits']}-bit", "experts": f"{step['expert_bits'] or step['bits']}-bit"}
    if step.get("average_bits") is not None:
        bits["experts"] = f"{step['average_bits']:g}-bit on average"
    parts = [f"{bits[t]} {'Linear' if t == 'linear' else 'expert'} weights" for t in step["targets"]]
    if len(parts) == 2 and bits["linear"] == bits["experts"]:
        parts = [f"{bits['linear']} Linear and expert weights"]
    return f"{' and '.join(parts)}, the rest {report['dtype']}"
