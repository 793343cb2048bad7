"""The topk, drop_layers and drop_blocks steps, run by `moekit.compress` (the layer-streamed
pass and writer) on tiny models of every family: what they write loads back (in plain
transformers where the format is standard) with the logits of the same edit made in
memory, and of a brute-force run of the original model without the dropped layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import moekit
from moekit.arch.edit import drop_blocks, drop_mlp, set_top_k
from moekit.arch.renumber import moe_layer_indices
from moekit.recipe.recipe import checked_recipe
from moekit.io.tokenizer import tokenizer_for
from moekit.errors import MoekitError
from moekit.zoo.tiny import tiny_config, tiny_model
from tests.conftest import FAMILIES
from tests.skipped_layer import SkippedLayer

CORPUS = Path(__file__).parent / "_fewer_calls_corpus.txt"
SMALL = dict(n_samples=2, seq_len=16, progress=False, data=str(CORPUS))
IDS = torch.randint(3, 300, (2, 14), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _without(family: str, dropped: list[int]) -> torch.Tensor:
    """Brute force: the original tiny model's logits with the dropped layers skipped."""
    model = tiny_model(family)
    for i in dropped:
        model.model.layers[i] = SkippedLayer(model.model.layers[i])
    return _logits(model)


def _plain_logits(root: Path, folders: list[Path]) -> list[torch.Tensor]:
    """Logits of each folder loaded by plain transformers, in a process without moekit."""
    from tests.reload import plain_logits

    return plain_logits(root, folders, IDS)


def _drop_choice(family: str, position: int) -> list[int]:
    """A block each family's config can lose: layer 0 or 1, alternating over families
    (Qwen3-Next's only full-attention layer, 1, must stay)."""
    return [0] if family == "qwen3_next" or position % 2 else [1]


def test_streamed_outputs_load_in_plain_transformers_with_moekit_logits(tmp_path):
    folders, expected, brute = [], [], []
    for position, family in enumerate(FAMILIES):  # drop_blocks: fewer layers, a standard config
        dropped = _drop_choice(family, position)
        out = tmp_path / f"blocks-{family}"
        report = moekit.compress(f"moekit/tiny-{family}", {"steps": [{"type": "drop_blocks", "layers": dropped}]},
                                 out_dir=out, **SMALL)
        assert report["format"] == "standard" and report["steps"][0]["dropped"] == dropped
        edited = tiny_model(family)
        drop_blocks(edited, dropped)
        assert edited.config.num_hidden_layers == 2
        folders.append(out)
        expected.append(_logits(edited))
        brute.append(_without(family, dropped))
        torch.testing.assert_close(_logits(moekit.load(out)), expected[-1], rtol=0, atol=1e-5)
    for family in ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4"):  # uniform top-k: standard too
        out = tmp_path / f"topk-{family}"
        moekit.compress(f"moekit/tiny-{family}", {"steps": [{"type": "topk", "k": 1}]}, out_dir=out, **SMALL)
        edited = tiny_model(family)
        set_top_k(edited, {i: 1 for i in moe_layer_indices(edited.config)})
        folders.append(out)
        expected.append(_logits(edited))
        brute.append(None)
    # from a checkpoint on disk (layers read one at a time), a block chosen on data, then pruning
    source = moekit.save(tiny_model("qwen3_moe"), tmp_path / "source", tokenizer=tokenizer_for("moekit/tiny-qwen3_moe"))
    out = tmp_path / "chosen-then-pruned"
    report = moekit.compress(str(source), {"steps": [{"type": "drop_blocks", "count": 1},
                                                     {"type": "prune", "method": "frequency", "keep": 6}]},
                             out_dir=out, **SMALL)
    dropped, kept = report["steps"][0]["dropped"], report["steps"][1]["kept"]
    assert len(dropped) == 1 and set(report["steps"][0]["scores"]) == {"0", "1", "2"}
    assert not set(map(int, kept)) & set(dropped)  # the later phase never saw the dropped block
    edited = tiny_model("qwen3_moe")
    moekit.keep_experts(edited, {int(i): ids for i, ids in kept.items()})
    drop_blocks(edited, dropped)
    folders.append(out)
    expected.append(_logits(edited))
    brute.append(None)
    for folder, plain, mine, skipped in zip(folders, _plain_logits(tmp_path, folders), expected, brute):
        torch.testing.assert_close(plain, mine, rtol=0, atol=1e-5, msg=str(folder))
        if skipped is not None:
            torch.testing.assert_close(mine, skipped, rtol=0, atol=1e-5, msg=str(folder))


def test_per_layer_topk_and_dropped_sublayers_restored_by_moekit_load(tmp_path):
    for family in FAMILIES:
        moe = moe_layer_indices(tiny_config(family))
        steps = [{"type": "drop_layers", "layers": [moe[-1]]}]
        sparsemixer = family == "phimoe"  # its top-k is fixed in transformers' code
        if not sparsemixer:
            steps.insert(0, {"type": "topk", "per_layer": {moe[0]: 1}})
        out = tmp_path / family
        report = moekit.compress(f"moekit/tiny-{family}", {"steps": steps}, out_dir=out, **SMALL)
        assert report["format"] == "moekit-nonuniform"
        assert not (out / "model.safetensors").exists()  # plain transformers fails loudly, never loads it wrong
        edited = tiny_model(family)
        if not sparsemixer:
            set_top_k(edited, {moe[0]: 1})
        drop_mlp(edited, [moe[-1]])
        loaded = moekit.load(out)
        assert [layer.index for layer in moekit.moe_layers(loaded)] == moe[:-1]
        torch.testing.assert_close(_logits(loaded), _logits(edited), rtol=0, atol=1e-6, msg=family)
    # an output in moekit's format, compressed again, stays in it with its edits
    again = tmp_path / "again"
    report = moekit.compress(str(tmp_path / "qwen3_moe"), {"steps": [{"type": "prune", "method": "frequency",
                                                                       "keep": 6}]}, out_dir=again, **SMALL)
    assert report["format"] == "moekit-nonuniform"
    edited = tiny_model("qwen3_moe")
    moekit.keep_experts(edited, {int(i): ids for i, ids in report["steps"][0]["kept"].items()})
    set_top_k(edited, {0: 1})
    drop_mlp(edited, [2])
    torch.testing.assert_close(_logits(moekit.load(again)), _logits(edited), rtol=0, atol=1e-6)


def test_calibrated_topk_meets_its_target_and_reloads(tmp_path):
    out = tmp_path / "out"
    report = moekit.compress("moekit/tiny-qwen3_moe", {"steps": [{"type": "topk", "target": 1.5}]},
                             out_dir=out, **SMALL)
    step = report["steps"][0]
    assert step["average_top_k"] == 1.5 and sorted(step["top_k"].values()) == [1, 2]
    edited = tiny_model("qwen3_moe")
    set_top_k(edited, {int(i): k for i, k in step["top_k"].items()})
    torch.testing.assert_close(_logits(moekit.load(out)), _logits(edited), rtol=0, atol=1e-6)
    # after a block drop, the average is over the MoE layers left (planned on the model without it)
    report = moekit.compress("moekit/tiny-qwen3_moe", {"steps": [{"type": "drop_blocks", "layers": [2]},
                                                                 {"type": "topk", "target": 1.0}]},
                             out_dir=tmp_path / "after-drop", **SMALL)
    assert report["steps"][1]["top_k"] == {"0": 1} and report["format"] == "standard"


@pytest.mark.parametrize(("recipe", "message"), [
    ({"type": "drop_blocks", "layers": [0, 1, 2]}, "leaves no model"),
    ({"type": "drop_blocks", "count": 3}, "every one of the 3 decoder layers; choose a count below 3"),
    ({"type": "drop_blocks", "layers": [7]}, r"layers \[7\] do not exist"),
    ({"type": "drop_blocks", "layers": [0, 2]}, "hold no MoE layer"),
    ({"type": "drop_layers", "layers": [1]}, r"no MoE sublayer to drop; MoE layers are \[0, 2\]"),
    ({"type": "drop_layers", "layers": [0, 2]}, "leaves no MoE"),
    ({"type": "drop_layers", "count": 2}, "choose a count below 2"),
    ({"type": "topk", "k": 3}, "choose k from 1 to 1"),
    ({"type": "topk", "k": 0}, "choose k from 1 to 1"),
    ({"type": "topk", "target": 0.5}, r"outside \[1, 2\)"),
    ({"type": "topk", "per_layer": {5: 1}}, r"per_layer names layers \[5\]"),
    ({"type": "topk", "per_layer": {0: 4}}, "outside 1..2"),
    ({"type": "topk"}, "exactly one of 'k'"),
    ({"type": "drop_blocks"}, "exactly one of 'layers'"),
])
def test_bad_parameters_refused_before_weights_load(tmp_path, recipe, message):
    with pytest.raises(MoekitError, match=message):
        checked_recipe("moekit/tiny-qwen3_moe", {"steps": [recipe]})
    with pytest.raises(MoekitError, match=message):
        moekit.compress("moekit/tiny-qwen3_moe", {"steps": [recipe]}, out_dir=tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists()


def test_sparsemixer_topk_refused():
    with pytest.raises(MoekitError, match="sparsemixer"):
        checked_recipe("moekit/tiny-phimoe", {"steps": [{"type": "topk", "k": 1}]})


def test_later_steps_are_checked_against_the_new_top_k():
    checked_recipe("moekit/tiny-qwen3_moe", {"steps": [{"type": "topk", "k": 1}, {"type": "prune", "keep": 1}]})
    with pytest.raises(MoekitError, match="already routes each token to 1 expert"):
        checked_recipe("moekit/tiny-qwen3_moe", {"steps": [{"type": "topk", "k": 1}, {"type": "topk", "k": 1}]})


@pytest.mark.parametrize("steps", [
    [{"type": "drop_blocks", "count": 1}, {"type": "prune", "method": "frequency", "keep": 6}],
    [{"type": "topk", "per_layer": {0: 1}}, {"type": "drop_layers", "count": 1}],
])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, steps):
    class Stop(Exception):
        pass

    def stop_after_layer_1(kind, n):
        if kind == "layer" and n == 1:
            raise Stop

    moekit.compress("moekit/tiny-qwen3_moe", {"steps": steps}, out_dir=tmp_path / "whole", **SMALL)
    with pytest.raises(Stop):
        moekit.compress("moekit/tiny-qwen3_moe", {"steps": steps}, out_dir=tmp_path / "resumed",
                        on_event=stop_after_layer_1, **SMALL)
    moekit.compress("moekit/tiny-qwen3_moe", {"steps": steps}, out_dir=tmp_path / "resumed", resume=True, **SMALL)
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in files:
        if name not in ("report.json", "README.md"):  # they hold timings
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    whole, resumed = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("whole", "resumed"))
    assert whole["steps"] == resumed["steps"]
    assert [c["model_fingerprint"] for c in whole["calibration"]] == \
        [c["model_fingerprint"] for c in resumed["calibration"]]
