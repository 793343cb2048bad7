"""The report's figures, one PNG each, drawn with matplotlib's Agg backend (no display).

Every figure stays readable from a 4-layer, 8-expert model to 60 layers of 256 experts:
per-layer quantities are lines over depth, loads are sorted curves rather than a
layers × experts wall, co-activation and transition heatmaps are drawn for at most four
layers (first, last, two between) with experts ordered by clustering, and labels are
dropped where they would overlap.
"""

from __future__ import annotations

import io
import math

import torch

from moekit.analyze import statistics as st

MAX_HEATMAP_LAYERS = 4
SORT_ABOVE = 64  # experts: above this, per-expert maps over layers are sorted per layer
DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # layer indices and counts: whole numbers on the line plots' x axes
        if not ax.images and ax.get_label() != "<colorbar>":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buffer.getvalue()


def _picked(n: int) -> list[int]:
    """At most `MAX_HEATMAP_LAYERS` positions out of n: the first, the last and evenly between."""
    if n <= MAX_HEATMAP_LAYERS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (MAX_HEATMAP_LAYERS - 1)) for i in range(MAX_HEATMAP_LAYERS)})


def _depth_colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _log2(matrix: torch.Tensor, clip: float = 3.0) -> torch.Tensor:
    return torch.where(matrix > 0, matrix.clamp(min=1e-12).log2(), torch.full_like(matrix, -clip)).clamp(-clip, clip)


def load(layers: list[dict], title: str) -> bytes:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = [layer["layer"] for layer in layers]
    a.plot(x, [layer["load"]["imbalance"] for layer in layers], "o-", label="max / mean")
    a.plot(x, [layer["load"]["cv"] for layer in layers], "s-", label="coefficient of variation")
    a.plot(x, [layer["load"]["entropy_normalized"] for layer in layers], "^-", label="router entropy / log E")
    dead = [len(layer["load"]["dead"]) + len(layer["load"]["near_dead"]) for layer in layers]
    a.set_xlabel("layer")
    a.set_title("imbalance per layer")
    a.legend(fontsize=8, loc="upper left")
    if any(dead):
        twin = a.twinx()
        twin.bar(x, dead, alpha=0.2, color="red")
        twin.set_ylabel("dead + near-dead experts (bars)", color="red")
    colors = _depth_colors(len(layers))
    for layer, color in zip(layers, colors):
        share = torch.tensor(layer["load"]["share"]) * layer["num_experts"]
        values = share.sort(descending=True).values.clamp(min=1e-3)
        b.plot(range(1, len(values) + 1), values, color=color, lw=1.2, label=f"layer {layer['layer']}")
    b.axhline(1.0, color="gray", ls="--", lw=0.8)
    b.set_yscale("log")
    b.set_xlabel("expert rank (most loaded first)")
    b.set_ylabel("share of selections × E (1 = fair)")
    b.set_title("sorted expert load, each line one layer")
    if len(layers) <= 8:
        b.legend(fontsize=7)
    else:
        _colorbar(fig, b, layers)
    fig.suptitle(title)
    return _png(fig)


def _colorbar(fig, ax, layers: list[dict]) -> None:
    plt = _plt()
    mappable = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(layers[0]["layer"], layers[-1]["layer"]))
    fig.colorbar(mappable, ax=ax, label="layer")


def coactivation(layers: list[dict], title: str) -> bytes:
    plt = _plt()
    picked = [layers[i] for i in _picked(len(layers))]
    fig, axes = plt.subplots(1, len(picked), figsize=(3.6 * len(picked) + 1, 3.8), squeeze=False,
                             layout="constrained")
    image = None
    for ax, layer in zip(axes[0], picked):
        order = layer["coactivation"]["order"]
        counts = torch.tensor(layer["coactivation"]["counts"], dtype=torch.float64)
        lift = st.coactivation_lift(counts, int(counts.diagonal().sum()) // layer["top_k"])[order][:, order]
        shown = _log2(lift)
        shown.fill_diagonal_(float("nan"))  # an expert with itself is not a pair
        image = ax.imshow(shown, cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
        ax.set_title(f"layer {layer['layer']}")
        if len(order) <= 32:
            ax.set_xticks(range(len(order)), order, fontsize=6, rotation=90)
            ax.set_yticks(range(len(order)), order, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("expert (clustered order)")
    fig.colorbar(image, ax=axes[0].tolist(), label="log2 lift (0 = independent)", shrink=0.8)
    fig.suptitle(title)
    return _png(fig)


def transitions(layers: list[dict], title: str) -> bytes:
    plt = _plt()
    pairs = [layer for layer in layers if "from_previous" in layer]
    picked = [pairs[i] for i in _picked(len(pairs))]
    by_index = {layer["layer"]: layer for layer in layers}
    fig, axes = plt.subplots(1, len(picked), figsize=(3.6 * len(picked) + 1, 3.8), squeeze=False,
                             layout="constrained")
    image = None
    for ax, layer in zip(axes[0], picked):
        nxt = layer["from_previous"]
        joint = torch.tensor(nxt["joint"], dtype=torch.float64)
        lift = joint * joint.sum() / (joint.sum(1, keepdim=True) @ joint.sum(0, keepdim=True)).clamp(min=1e-12)
        rows = by_index[nxt["previous_layer"]]["coactivation"]["order"]
        cols = layer["coactivation"]["order"]
        image = ax.imshow(_log2(lift[rows][:, cols]), cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
        ax.set_title(f"layer {nxt['previous_layer']} → {layer['layer']}\nMI {nxt['mutual_information_bits']:.2f} bits",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"expert at layer {layer['layer']}")
        ax.set_ylabel(f"expert at layer {nxt['previous_layer']}")
    fig.colorbar(image, ax=axes[0].tolist(), label="log2 P(i, j) / P(i)P(j)", shrink=0.8)
    fig.suptitle(title)
    return _png(fig)


def predictability(layers: list[dict], title: str) -> bytes:
    plt = _plt()
    pairs = [layer for layer in layers if "from_previous" in layer]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = [layer["layer"] for layer in pairs]
    ax.plot(x, [layer["from_previous"]["prefetch_recall"] for layer in pairs], "o-",
            label="one-step predictor recall@k")
    ax.plot(x, [layer["from_previous"]["static_recall"] for layer in pairs], "s--",
            label="always the k most loaded (baseline)")
    ax.plot(x, [layer["from_previous"]["mutual_information_normalized"] for layer in pairs], "^-",
            label="MI with previous layer / min entropy")
    ax.plot(x, [layer["from_previous"]["mutual_information_top1_normalized"] for layer in pairs], "v:",
            label="the same, first-ranked experts only")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer (predicted)")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _png(fig)


def tokens(layers: list[dict], title: str) -> bytes:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1.2]})
    x = [layer["layer"] for layer in layers]
    a.plot(x, [layer["tokens"]["lookup_agreement"] for layer in layers], "o-", label="token-id lookup (held out)")
    a.plot(x, [layer["tokens"]["static_agreement"] for layer in layers], "s--", label="k most loaded (baseline)")
    a.plot(x, [layer["tokens"]["mean_concentration"] or 0 for layer in layers], "^-",
           label="mean concentration of frequent tokens")
    a.plot(x, [layer["tokens"]["uniform_concentration"] for layer in layers], ":", color="gray",
           label="concentration if uniform (k/E)")
    a.set_ylim(0, 1.02)
    a.set_xlabel("layer")
    a.set_title("share of routing decisions explained by token id")
    a.legend(fontsize=7)
    frequent = layers[0]["tokens"]["frequent"]
    grid = torch.tensor([[t["concentration"] for t in layer["tokens"]["frequent"]] for layer in layers]).T
    image = b.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    b.set_yticks(range(len(frequent)), [_label(t) for t in frequent], fontsize=7, parse_math=False)  # '$' is text
    step = max(1, math.ceil(len(layers) / 16))
    b.set_xticks(range(0, len(layers), step), [layers[i]["layer"] for i in range(0, len(layers), step)])
    b.set_xlabel("layer")
    b.set_title("concentration of the most frequent tokens")
    fig.colorbar(image, ax=b, label="share of its selections on its top-k experts")
    fig.suptitle(title)
    return _png(fig)


_VISIBLE = {" ": "␣", "\n": "↵", "\t": "→"}  # whitespace tokens are common in code; DejaVu Sans draws these


def _label(token: dict) -> str:
    """A token's text on one line with its whitespace visible (``'↵␣␣␣␣'``, not a blank
    label or one broken over two lines); other unprintable characters as escapes."""
    text = token.get("text")
    if text is None:
        return f"{token['id']}"
    shown = "".join(_VISIBLE.get(c) or (c if c.isprintable() else repr(c)[1:-1]) for c in text)
    return f"'{shown[:12]}'"


def position(layers: list[dict], title: str) -> bytes:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    grid = torch.tensor([layer["position"]["divergence"] for layer in layers])
    image = a.imshow(grid, aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
    buckets, seq_len = layers[0]["position"]["buckets"], layers[0]["position"]["seq_len"]
    a.set_xticks(range(buckets), [f"{i * seq_len // buckets}" for i in range(buckets)], fontsize=7)
    step = max(1, math.ceil(len(layers) / 16))
    a.set_yticks(range(0, len(layers), step), [layers[i]["layer"] for i in range(0, len(layers), step)])
    a.set_xlabel("position bucket (first position)")
    a.set_ylabel("layer")
    a.set_title("total variation from the layer's overall load")
    fig.colorbar(image, ax=a)
    worst = max(layers, key=lambda layer: layer["position"]["max_divergence"])
    counts = torch.tensor(worst["position"]["counts"], dtype=torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    overall = counts.sum(0) / counts.sum().clamp(min=1)
    order = overall.argsort(descending=True)
    ratio = (shares / overall.clamp(min=1e-12))[:, order]
    image = b.imshow(_log2(ratio, 2.0), aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2, interpolation="nearest")
    if len(order) <= 32:
        b.set_xticks(range(len(order)), order.tolist(), fontsize=7)
    b.set_xlabel("expert (most loaded first)")
    b.set_ylabel("position bucket")
    b.set_title(f"layer {worst['layer']}: share by bucket / overall share")
    fig.colorbar(image, ax=b, label="log2")
    fig.suptitle(title)
    return _png(fig)


def domains(layers: list[dict], title: str) -> bytes:
    plt = _plt()
    corpora = layers[0]["domains"]["corpora"]
    fig, axes = plt.subplots(1, len(corpora) + 1, figsize=(3.8 * (len(corpora) + 1), 4), squeeze=False,
                             layout="constrained")
    image = None
    for d, (ax, name) in enumerate(zip(axes[0], corpora)):
        width = max(layer["num_experts"] for layer in layers)
        ranked = width > SORT_ABOVE  # too many experts to follow one: each layer's experts sorted by z
        grid = torch.full((len(layers), width), float("nan"))
        for i, layer in enumerate(layers):
            z = torch.tensor(layer["domains"]["z"][d])
            grid[i, : z.numel()] = z.sort(descending=True).values if ranked else z
        image = ax.imshow(grid.clamp(-6, 6), aspect="auto", cmap="PuOr_r", vmin=-6, vmax=6, interpolation="nearest")
        ax.set_title(f"{name}", fontsize=9)
        ax.set_xlabel("expert rank by z (sorted per layer)" if ranked else "expert")
        step = max(1, math.ceil(len(layers) / 16))
        ax.set_yticks(range(0, len(layers), step), [layers[i]["layer"] for i in range(0, len(layers), step)])
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0, :-1].tolist(), label="log-odds z (Dirichlet prior)", shrink=0.8)
    ax = axes[0, -1]
    x = [layer["layer"] for layer in layers]
    for name in corpora:
        ax.plot(x, [layer["domains"]["specific_count"][name] for layer in layers], "o-", label=name)
    ax.set_xlabel("layer")
    ax.set_title("experts with z > 1.96", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(title)
    return _png(fig)


def attribution(result: dict, title: str) -> bytes:
    plt = _plt()
    experts = result["experts"]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(experts) + 1.5))
    labels = [f"layer {e['layer']} expert {e['expert']}" for e in experts]
    ax.barh(range(len(experts)), [e["increase"] for e in experts], color="tab:red")
    ax.set_yticks(range(len(experts)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"loss increase on {result['corpus']} when masked (nats; base {result['loss']:.3f})")
    ax.set_title(title)
    return _png(fig)


def comparison(a: dict, b: dict, title: str) -> bytes:
    """Two analyses' per-layer headline numbers side by side (``a``, ``b``: `Analysis.to_dict`)."""
    plt = _plt()
    metrics = [
        ("router entropy / log E", lambda layer: layer["load"]["entropy_normalized"]),
        ("load max / mean", lambda layer: layer["load"]["imbalance"]),
        ("token-id lookup agreement", lambda layer: layer["tokens"]["lookup_agreement"]),
        ("one-step predictor recall@k", lambda layer: (layer.get("from_previous") or {}).get("prefetch_recall")),
        ("MI with previous layer (normalised)",
         lambda layer: (layer.get("from_previous") or {}).get("mutual_information_normalized")),
        ("max position divergence", lambda layer: layer["position"]["max_divergence"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), layout="constrained")
    for ax, (label, get) in zip(axes.flat, metrics):
        for analysis, style in ((a, "o-"), (b, "s--")):
            points = [(layer["layer"], get(layer)) for layer in analysis["layers"] if get(layer) is not None]
            if points:
                ax.plot(*zip(*points), style, label=analysis["model"])
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("layer")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    return _png(fig)


def all_figures(analysis: dict) -> dict[str, bytes]:
    """{file stem: PNG} of one analysis (``Analysis.to_dict``)."""
    layers, model = analysis["layers"], analysis["model"]
    out = {
        "load": load(layers, f"{model}: expert load"),
        "coactivation": coactivation(layers, f"{model}: co-activation lift (experts clustered)"),
        "tokens": tokens(layers, f"{model}: token-id specialisation"),
        "position": position(layers, f"{model}: routing by position"),
    }
    if any("from_previous" in layer for layer in layers):
        out["transitions"] = transitions(layers, f"{model}: layer-to-layer transitions")
        out["predictability"] = predictability(layers, f"{model}: how predictable is the next layer")
    if len(layers[0]["domains"]["corpora"]) > 1:
        out["domains"] = domains(layers, f"{model}: domain specificity per expert")
    if analysis.get("attribution"):
        out["attribution"] = attribution(analysis["attribution"], f"{model}: expert attribution")
    return out
