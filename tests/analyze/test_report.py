"""The analysis folder: a self-contained report.html holding every figure, one PNG per
figure, and analysis.json that reads back into the same analyses."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

from moekit.analyze import analyze
from moekit.analyze.compare import compare
from moekit.analyze.report import read, write
from moekit.errors import MoekitError
from moekit.zoo.tiny import tiny_model

GEN = torch.Generator().manual_seed(4)
DATA = {"a": torch.randint(3, 200, (4, 128), generator=GEN), "b": torch.randint(150, 380, (4, 128), generator=GEN)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    one = analyze(tiny_model("qwen3_moe", seed=0), DATA, focus="a", candidates=2, name="first", progress=False)
    two = analyze(tiny_model("qwen3_moe", seed=1), DATA, focus="a", candidates=2, name="second", progress=False)
    out = tmp_path_factory.mktemp("report") / "out"
    written = write(out, [one, two], compare(one, two))
    return out, written, (one, two)


def test_html_is_self_contained_and_holds_every_figure(folder):
    out, written, _ = folder
    page = (out / "report.html").read_text()
    pngs = sorted(p.name for p in (out / "figures").iterdir())
    assert sorted(f.split("/")[1] for f in written["figures"]) == pngs
    stems = {"load", "coactivation", "tokens", "position", "transitions", "predictability", "domains", "attribution"}
    assert {f"m{i}-{s}.png" for i in (0, 1) for s in stems} | {"compare.png"} == set(pngs)
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted((out / "figures" / p).read_bytes() for p in pngs)
    assert not re.search(r"https?:", page) and "<script" not in page and "<link" not in page
    assert len(re.findall(r"\ssrc=", page)) == len(pngs)  # nothing else is fetched
    assert page.count("<tr class='changed'>") == 3  # the comparison highlights its three largest changes
    for term in ("Co-activation lift", "Token-id lookup agreement", "Monroe", "recall@k", "Attribution"):
        assert term in page  # every statistic is defined in the report


def test_json_reads_back_into_the_same_analyses(folder):
    out, _, analyses = folder
    back, comparison = read(out)
    assert [a.to_dict() for a in back] == [json.loads(json.dumps(a.to_dict())) for a in analyses]
    assert comparison["a"] == "first" and comparison["b"] == "second"
    entropy = comparison["summary"]["entropy_normalized"]
    assert entropy["difference"] == pytest.approx(entropy["b"] - entropy["a"])
    assert back[0].summary["moe_layers"] == 2


def test_existing_folder_and_other_tokens_are_refused(folder, tmp_path):
    out, _, (one, _) = folder
    with pytest.raises(MoekitError, match="already exists"):
        write(out, [one])
    other = analyze(tiny_model("qwen3_moe"), {"a": DATA["b"], "b": DATA["a"]}, progress=False)
    with pytest.raises(MoekitError, match="different tokens"):
        compare(one, other)


def test_compare_before_and_after_pruning():
    """Layers with different expert counts compare by their summaries; the load distance,
    defined only for the same experts, is left out."""
    import copy

    import moekit

    model = tiny_model("qwen3_moe")
    pruned = copy.deepcopy(model)
    moekit.keep_experts(pruned, {layer.index: [0, 1, 2, 3] for layer in moekit.moe_layers(pruned)})
    a, b = (analyze(m, DATA, progress=False) for m in (model, pruned))
    result = compare(a, b)
    assert [row["layer"] for row in result["layers"]] == [0, 2]
    assert all(row["load_distance"] is None for row in result["layers"])
    assert compare(a, a)["layers"][0]["load_distance"] == 0.0
    assert b.layers[0]["num_experts"] == 4 and len(b.layers[0]["load"]["count"]) == 4
