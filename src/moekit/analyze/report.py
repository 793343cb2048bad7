"""The analysis folder: ``report.html`` (self-contained: every figure embedded as a
base64 PNG, no script, no stylesheet or font fetched, no link), one PNG per figure under
``figures/``, and ``analysis.json`` with every number behind them. `read` loads the JSON
back into `Analysis` objects."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from moekit.analyze import figures
from moekit.analyze.run import Analysis

DEFINITIONS = [
    ("Load", "share of the layer's top-k selections each expert receives (count / k·T) and of its gate mass "
             "(Σ weights / Σ all weights); imbalance = max count / mean count; CV = std / mean of the counts; "
             "dead = never chosen; near-dead = chosen but under 10% of the fair share k·T/E; router entropy = mean "
             "over tokens of the entropy of the router's distribution over all E experts, divided by log E."),
    ("Co-activation lift", "C[i,j]·T / (C[i,i]·C[j,j]), C[i,j] the tokens on which i and j are both chosen: 1 = "
                           "as often as independent choices would be, >1 coupled. Heatmaps show log2 lift with "
                           "experts ordered by average-linkage clustering on 1/(1+lift). Top pairs need ≥ 5 tokens."),
    ("Cross-layer mutual information", "MI (bits) of the joint distribution of (a selection at the previous MoE "
                                       "layer, a selection at this one) over the pairs of each token's chosen "
                                       "experts, normalised by the smaller marginal entropy (0 independent, 1 "
                                       "determined); 'top-1' the same for each token's first-ranked experts "
                                       "only."),
    ("One-step predictor recall@k", "this layer's router applied to the previous MoE layer's block input (what an "
                                    "offloading system computes to prefetch experts one layer ahead); recall@k = "
                                    "mean |predicted top-k ∩ real top-k| / k over every m-th token of all rows (at "
                                    "most prefetch_tokens of them). "
                                    "Baseline: always predict the layer's k most loaded experts."),
    ("Token-id lookup agreement", "a table token id → its k most frequent experts, fitted on the even rows of each "
                                  "corpus and scored on the odd rows: mean |lookup ∩ real top-k| / k (ids unseen "
                                  "in the fit rows get the k most loaded experts). 1.0 = routing is decided by the "
                                  "token id alone (OpenMoE's context independence). Concentration of a token = "
                                  "share of its selections on its own k most frequent experts (k/E if uniform); "
                                  "the mean is weighted by occurrences over ids seen ≥ 5 times. The tokens most tied to an "
                                  "expert: ids seen ≥ 5 times with the largest share of their occurrences routed to "
                                  "it."),
    ("Position", "positions 0..S-1 cut into equal buckets; divergence = total variation ½Σ|P_bucket(j) − P(j)| "
                 "between a bucket's expert distribution and the layer's overall one."),
    ("Domain specificity", "z-score of Monroe et al.'s (2008) log-odds ratio with an informative Dirichlet prior "
                           "(α_j = 1000·pooled share of j), each corpus against the other corpora pooled; "
                           "'specific' = z > 1.96. Selections within a sequence are not independent: read z as a "
                           "ranking, not a calibrated test."),
    ("Attribution", "for the candidates with the largest gate share × E on the focus corpus, the mean next-token "
                    "cross-entropy on its rows with the expert masked out of routing (never chosen, absent from "
                    "every normalisation, as if removed) minus the unmasked loss, in nats."),
]


LABELS = {
    "moe_layers": "MoE layers",
    "entropy_normalized": "router entropy / log E",
    "imbalance": "load max / mean",
    "dead_experts": "dead experts (all layers)",
    "near_dead_experts": "near-dead experts (all layers)",
    "token_lookup_agreement": "token-id lookup agreement (held out)",
    "token_static_agreement": "… baseline: the k most loaded experts",
    "token_concentration": "concentration of frequent tokens on their top-k",
    "prefetch_recall": "one-step predictor recall@k",
    "prefetch_static_recall": "… baseline: the k most loaded experts",
    "mutual_information_normalized": "MI with the previous layer / min entropy",
    "mutual_information_top1_normalized": "… first-ranked experts only",
    "position_max_divergence": "largest position-bucket divergence (max over layers)",
}


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}.png</figcaption></figure>'


def _model_section(analysis: dict, pngs: dict[str, bytes], prefix: str) -> str:
    s = analysis["summary"]
    parts = [f"<h2>{html.escape(analysis['model'])}</h2>"]
    parts.append(_table(["statistic (mean over MoE layers)", "value"],
                        [[LABELS.get(k, k), v] for k, v in s.items() if not isinstance(v, dict)]
                        + [[f"experts specific to {c} (z > 1.96, all layers)", n]
                           for c, n in s.get("specific_experts", {}).items()]))
    for name, png in pngs.items():
        parts.append(_img(f"{prefix}{name}", png))
    layers = analysis["layers"]
    parts.append("<h3>Most coupled expert pairs</h3>")
    parts.append(_table(["layer", "experts", "lift", "tokens together"],
                        [[layer["layer"], f"{p['experts'][0]} & {p['experts'][1]}", p["lift"], p["together"]]
                         for layer in layers for p in layer["coactivation"]["top_pairs"][:3]]))
    parts.append("<h3>Tokens most tied to an expert</h3>")
    ties = []
    for layer in layers:
        best = sorted(((t["share"], t["count"], j, t) for j, tops in enumerate(layer["tokens"]["per_expert"])
                       for t in tops[:1]), key=lambda x: (-x[0], -x[1]))[:5]
        ties += [[layer["layer"], j, repr(t["text"]) if t["text"] is not None else t["id"], t["share"], t["count"]]
                 for _, _, j, t in best]
    parts.append(_table(["layer", "expert", "token", "share of the token's occurrences routed to the expert",
                         "count"], ties))
    if "specific" in layers[0]["domains"]:
        parts.append("<h3>Domain-specific experts (z &gt; 1.96, top 5 per layer)</h3>")
        parts.append(_table(["layer", "corpus", "experts (z)"],
                            [[layer["layer"], name, ", ".join(f"{e['expert']} ({e['z']:.1f})" for e in experts)]
                             for layer in layers for name, experts in layer["domains"]["specific"].items()]))
    attribution = analysis.get("attribution")
    if attribution:
        parts.append(f"<h3>Attribution on {html.escape(attribution['corpus'])} (base loss "
                     f"{attribution['loss']:.4f} nats, {attribution['tokens']} predicted tokens)</h3>")
        parts.append(_table(["layer", "expert", "loss masked", "increase"],
                            [[e["layer"], e["expert"], e["loss"], e["increase"]] for e in attribution["experts"]]))
    dead = [[layer["layer"], ", ".join(map(str, layer["load"]["dead"])) or "–",
             ", ".join(map(str, layer["load"]["near_dead"])) or "–"] for layer in layers]
    parts.append("<h3>Dead and near-dead experts</h3>" + _table(["layer", "dead", "near-dead"], dead))
    return "\n".join(parts)


STYLE = ("body{font-family:sans-serif;max-width:1300px;margin:1em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
         "tr.changed{background:#fff3c4}img{max-width:100%}figure{margin:1em 0}figcaption{color:#777;font-size:12px}dt{font-weight:bold}")


def render(analyses: list[dict], pngs: list[dict[str, bytes]], comparison: dict | None,
           comparison_png: bytes | None) -> str:
    first = analyses[0]
    corpora = ", ".join(f"{html.escape(c['name'])} ({c['tokens']} tokens)" for c in first["corpora"])
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>moekit routing analysis</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Routing analysis: {' vs '.join(html.escape(a['model']) for a in analyses)}</h1>",
             f"<p>Corpora: {corpora}; rows of {first['meta']['seq_len']} tokens.</p>"]
    if comparison is not None:
        parts.append("<h2>Comparison</h2><p>Same tokens for both models; differences are "
                     f"{html.escape(comparison['b'])} − {html.escape(comparison['a'])}. Largest relative changes: "
                     f"<b>{html.escape(', '.join(comparison['largest_changes']))}</b>.</p>")
        rows = []
        for key, v in comparison["summary"].items():
            cells = [_fmt(c) for c in (LABELS.get(key, key), v["a"], v["b"], v["difference"])]
            if key in comparison["largest_changes"]:  # highlighted: the largest relative changes
                cells = [f"<b>{c}</b>" for c in cells]
            rows.append("<tr class='changed'>" if key in comparison["largest_changes"] else "<tr>")
            rows[-1] += "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        head = "".join(f"<th>{html.escape(h)}</th>" for h in ("statistic", comparison["a"], comparison["b"],
                                                                  "difference (b − a)"))
        parts.append(f"<table><tr>{head}</tr>{''.join(rows)}</table>")
        parts.append(_img("compare", comparison_png))
        parts.append(_table(["layer", "Δ entropy", "Δ imbalance", "Δ token agreement", "Δ prefetch recall",
                             "load distance (TV)"],
                            [[r["layer"], r["entropy_normalized"], r["imbalance"], r["token_lookup_agreement"],
                              r["prefetch_recall"], r["load_distance"]] for r in comparison["layers"]]))
    for i, (analysis, figs) in enumerate(zip(analyses, pngs)):
        parts.append(_model_section(analysis, figs, f"m{i}-" if len(analyses) > 1 else ""))
    parts.append("<h2>Definitions</h2><dl>")
    parts += [f"<dt>{html.escape(t)}</dt><dd>{html.escape(d)}</dd>" for t, d in DEFINITIONS]
    parts.append("</dl></body></html>")
    return "\n".join(parts)


def write(out_dir: str | os.PathLike, analyses: list[Analysis], comparison: dict | None = None) -> dict:
    """Write the folder (atomically; never into an existing one). Returns {"out", "figures"}."""
    from moekit.io.outputs import check_output
    from moekit.io.save import atomic_dir

    check_output(out_dir)  # before drawing anything
    dicts = [a.to_dict() for a in analyses]
    pngs = [figures.all_figures(d) for d in dicts]
    comparison_png = figures.comparison(dicts[0], dicts[1], f"{dicts[0]['model']} vs {dicts[1]['model']}") \
        if comparison is not None else None
    names = []
    with atomic_dir(out_dir) as tmp:
        (tmp / "figures").mkdir()
        for i, figs in enumerate(pngs):
            prefix = f"m{i}-" if len(pngs) > 1 else ""
            for name, png in figs.items():
                (tmp / "figures" / f"{prefix}{name}.png").write_bytes(png)
                names.append(f"figures/{prefix}{name}.png")
        if comparison_png is not None:
            (tmp / "figures" / "compare.png").write_bytes(comparison_png)
            names.append("figures/compare.png")
        (tmp / "report.html").write_text(render(dicts, pngs, comparison, comparison_png))
        payload = {"format": "moekit-analysis", "version": 1, "analyses": dicts, "comparison": comparison}
        (tmp / "analysis.json").write_text(json.dumps(payload))
    return {"out": str(Path(out_dir).expanduser().resolve()), "figures": names}


def read(folder: str | os.PathLike) -> tuple[list[Analysis], dict | None]:
    """The analyses and comparison an analysis folder holds (from its analysis.json)."""
    from moekit.errors import read_json

    payload = read_json(Path(folder) / "analysis.json", fix="run moekit analyze again.")
    return [Analysis(**d) for d in payload["analyses"]], payload.get("comparison")
