"""Two models' routing on the same tokens, side by side (`moekit analyze A B`)."""

from __future__ import annotations

import torch

from moekit.analyze.run import Analysis
from moekit.errors import MoekitError

HEADLINE = ("entropy_normalized", "imbalance", "dead_experts", "near_dead_experts", "token_lookup_agreement",
            "token_concentration", "prefetch_recall", "prefetch_static_recall", "mutual_information_normalized",
            "mutual_information_top1_normalized",
            "position_max_divergence")


def check_same_tokenizer(names: list[str], tokenizers: list) -> None:
    """Refuse to compare models whose tokenizers differ: their routing would be measured on
    different token sequences, so no per-token statistic would compare."""
    first = tokenizers[0].get_vocab()
    for name, tokenizer in zip(names[1:], tokenizers[1:]):
        if tokenizer.get_vocab() != first:
            raise MoekitError(
                f"{name} uses a different tokenizer from {names[0]}: the same text becomes different tokens, so "
                "their routing cannot be compared token by token. Analyze them in separate runs.")


def compare(a: Analysis, b: Analysis) -> dict:
    """Differences b − a of the headline numbers, and per MoE layer present in both: the
    differences of entropy, imbalance, token-lookup agreement and prefetch recall, and the
    total-variation distance between the two load distributions (when the layer has the
    same number of experts in both; 0 = the same experts carry the same shares)."""
    if a.meta.get("data_fingerprint") != b.meta.get("data_fingerprint"):
        raise MoekitError("the two analyses were made on different tokens; compare models on the same data.")
    summary = {}
    for key in HEADLINE:
        x, y = a.summary.get(key), b.summary.get(key)
        summary[key] = {"a": x, "b": y, "difference": None if x is None or y is None else y - x}
    by_b = {layer["layer"]: layer for layer in b.layers}
    layers = []
    for la in a.layers:
        lb = by_b.get(la["layer"])
        if lb is None:
            continue
        row = {"layer": la["layer"],
               "entropy_normalized": lb["load"]["entropy_normalized"] - la["load"]["entropy_normalized"],
               "imbalance": lb["load"]["imbalance"] - la["load"]["imbalance"],
               "token_lookup_agreement": lb["tokens"]["lookup_agreement"] - la["tokens"]["lookup_agreement"]}
        pa, pb = la.get("from_previous"), lb.get("from_previous")
        row["prefetch_recall"] = pb["prefetch_recall"] - pa["prefetch_recall"] if pa and pb else None
        if la["num_experts"] == lb["num_experts"]:
            row["load_distance"] = 0.5 * float((torch.tensor(la["load"]["share"])
                                                - torch.tensor(lb["load"]["share"])).abs().sum())
        else:
            row["load_distance"] = None
        layers.append(row)
    largest = sorted((k for k in summary if summary[k]["difference"] is not None),
                     key=lambda k: -abs(summary[k]["difference"]) / max(abs(summary[k]["a"] or 0), 1e-9))
    return {"a": a.model, "b": b.model, "summary": summary, "layers": layers, "largest_changes": largest[:3]}
