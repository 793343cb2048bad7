"""`moekit compress` end to end: standard and non-uniform outputs, reports, failures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import moekit
import moekit.data
from moekit.cli import app
from moekit.errors import MoekitError
from moekit.io.load import stored_dtype
from moekit.recipe import presets
from moekit.zoo.tiny import tiny_config
from tests.checkpoints import write_checkpoints
from tests.conftest import FAMILIES, removed_share
from tests.reload import plain_logits

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from moekit.data.tokenizer import load_tokenizer, save_tokenizer

    # Fixed text: outcomes such as the global budget's allocation depend on the data.
    root = write_checkpoints(tmp_path_factory.mktemp("compress"), FAMILIES, documents=6, vocab_size=400)
    for family in ("mixtral", "deepseek_v3"):  # bf16 checkpoints; DeepSeek-V3 keeps its router in fp32
        AutoModelForCausalLM.from_pretrained(root / family, dtype=torch.bfloat16).save_pretrained(root / f"{family}-bf16")
        save_tokenizer(load_tokenizer(root / family), root / f"{family}-bf16")
    return root


def _compress(workspace, family, recipe, out, **kw):
    kw = {"n_samples": 8, "seq_len": 64, **kw}
    return moekit.compress(str(workspace / family), recipe, out_dir=out, data=str(workspace / "data"),
                           progress=False, **kw)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("method", ["reap", "reconstruction", "random"])
def test_compress_writes_a_standard_checkpoint(workspace, tmp_path, family, method):
    out = tmp_path / "out"
    report = _compress(workspace, family, {"steps": [{"type": "prune", "method": method, "keep": 4}]}, out)
    assert {p.name for p in out.iterdir()} >= {"README.md", "config.json", "model.safetensors",
                                               "recipe.yaml", "report.json", "tokenizer.json"}
    assert report["format"] == "standard"
    assert set(report["after"]["experts_per_layer"].values()) == {4}
    assert report["after"]["routed_params"] * 2 == report["before"]["routed_params"]
    assert json.loads((out / "report.json").read_text())["steps"][0]["kept"] == report["steps"][0]["kept"]
    assert report["calibration"][0]["statistics"] == sorted(
        {"frequency"} | ({"reap"} if method == "reap" else set())
        | ({"reap", "hidden_sample"} if method == "reconstruction" else set()))
    # plain transformers in a fresh process that never imports moekit, without a warning
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    (theirs,) = plain_logits(tmp_path, [out], ids, dtype="auto")
    with torch.no_grad():
        ours = moekit.load(out, dtype=stored_dtype(out))(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def recommended_on_every_family(workspace, tmp_path_factory):
    """`prune-50` (REAP + refit) on every family, then every output loaded in one process
    that never imports moekit."""
    root = tmp_path_factory.mktemp("presets")
    reports = {family: _compress(workspace, family, "prune-50", root / family) for family in FAMILIES}
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    plain = plain_logits(root, [root / f for f in FAMILIES], ids)
    with torch.no_grad():
        ours = {family: moekit.load(root / family)(ids).logits for family in FAMILIES}
    return reports, ours, dict(zip(FAMILIES, plain, strict=True))


def test_recommended_preset_on_every_family(family, recommended_on_every_family):
    reports, ours, plain = recommended_on_every_family
    assert reports[family]["format"] == "standard"
    assert set(reports[family]["after"]["experts_per_layer"].values()) == {4}
    assert set(reports[family]["steps"][0]["refit"]) == set(reports[family]["steps"][0]["kept"])
    assert (ours[family] - plain[family]).abs().max().item() <= 1e-5


def test_plan_gives_the_sizes_compress_reports(family, workspace, recommended_on_every_family):
    reports, _, _ = recommended_on_every_family
    planned = moekit.plan(str(workspace / family), "prune-50")
    assert planned["before"] == reports[family]["before"] and planned["after"] == reports[family]["after"]
    assert planned["exact_per_layer"] and planned["dtype"] == reports[family]["dtype"]


@pytest.mark.parametrize("preset", sorted(presets()))
def test_every_preset_runs(workspace, tmp_path, preset):
    report = _compress(workspace, "qwen2_moe", preset, tmp_path / "out")
    kept = 8 - round(8 * removed_share(preset))
    assert set(report["after"]["experts_per_layer"].values()) == {kept}
    quantizes = any(step["type"] == "quantize" for step in report["recipe"]["steps"])
    assert ("quantization_config" in json.loads((tmp_path / "out" / "config.json").read_text())) == quantizes


def test_too_few_calibration_tokens_for_the_recipe_is_noted_with_the_fix(workspace, tmp_path):
    recipe = {"steps": [{"type": "prune", "method": "reap", "keep": 4, "refit": True, "refit_samples": 1000}]}
    short = _compress(workspace, "mixtral", recipe, tmp_path / "short")  # 8 × 64 = 512 tokens
    assert short["notes"] == ["the recipe asks for 1,000 calibration inputs per layer but 8 sequences of 64 tokens "
                              "hold 512; its steps used all 512. Pass --samples 16 for the full sample."]
    assert "Note: the recipe asks for 1,000" in (tmp_path / "short" / "README.md").read_text()
    enough = _compress(workspace, "mixtral", recipe, tmp_path / "enough", n_samples=16)
    assert enough["notes"] == []


def test_evaluation_rows_are_spread_over_the_whole_corpus():
    from moekit.eval.rows import spread_rows

    stream = torch.arange(10 * 256 + 17)
    rows = spread_rows(stream, 3 * 256, 256)
    assert rows.shape == (3, 256)
    assert [int(r[0]) // 256 for r in rows] == [0, 4, 9]  # first, middle and last full rows
    assert torch.equal(spread_rows(stream, None, 256), stream[: 10 * 256].view(10, 256))
    assert spread_rows(torch.arange(100), 512, 256).shape == (1, 100)  # shorter than a row


def test_global_budget_round_trips_the_nonuniform_format(workspace, tmp_path):
    out = tmp_path / "out"
    # On this seeded tiny Granite-MoE and the fixed data, the layers' usage differs enough that counts differ.
    report = _compress(workspace, "granitemoe", {"steps": [{"type": "prune", "method": "frequency", "keep": 4,
                                                      "budget": "global"}]}, out)
    counts = report["after"]["experts_per_layer"]
    assert sum(counts.values()) == 12 and len(set(counts.values())) > 1
    assert report["format"] == "moekit-nonuniform" and not (out / "model.safetensors").exists()
    assert "moekit.load" in (out / "README.md").read_text()
    loaded = moekit.load(out)
    assert {str(k): v for k, v in moekit.arch.edit.experts_per_layer(loaded).items()} == counts
    # Planned in advance: the totals are exact, the split between layers is not known.
    planned = moekit.plan(str(workspace / "granitemoe"), report["recipe"])
    assert not planned["exact_per_layer"] and "budget: global" in planned["notes"][0]
    for key in ("total_params", "routed_params", "bytes"):
        assert planned["after"][key] == report["after"][key]
    # ... and a plan of the non-uniform output starts from its real per-layer counts.
    assert moekit.plan(str(out), {"steps": [{"type": "prune", "keep": 2}]})["before"] == report["after"]
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(out)


def test_nonuniform_format_is_exact(tmp_path):
    from moekit.io.nonuniform import write_nonuniform

    model = moekit.load("moekit/tiny-qwen2_moe")
    moekit.keep_experts(model, {1: [0, 2, 4, 6, 7], 2: [1, 2, 3]})
    (tmp_path / "m").mkdir()
    write_nonuniform(model, tmp_path / "m")
    again = moekit.load(tmp_path / "m")
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_eval_before_and_after(workspace, tmp_path):
    report = _compress(workspace, "mixtral", "prune-25", tmp_path / "out", evaluate=True,
                       eval_data=str(workspace / "data"), eval_max_tokens=600)
    length = min(256, tiny_config("mixtral").max_position_embeddings)  # 256: two rows fit in 600 tokens
    assert report["before"]["eval"]["tokens"] == report["after"]["eval"]["tokens"] == (600 // length) * (length - 1)
    assert (report["before"]["eval"]["rows"], report["before"]["eval"]["row_length"]) == (600 // length, length)
    assert f"| perplexity ({(600 // length) * (length - 1):,} tokens predicted: {600 // length} rows of {length}) |" \
        in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_a_bf16_model_is_saved_in_bf16_and_evaluated_as_saved(workspace, tmp_path, family):
    from moekit.eval.rows import evaluate_rows as _evaluate
    from moekit.eval.rows import spread_rows
    from moekit.data.tokens import evaluation_stream
    from moekit.io.tokenizer import tokenizer_for

    source, out = workspace / f"{family}-bf16", tmp_path / "out"
    report = _compress(workspace, f"{family}-bf16", "prune-50", out, evaluate=True,
                       eval_data=str(workspace / "data"), eval_max_tokens=512)

    def dtypes(folder):
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}

    before, after = dtypes(source), dtypes(out)
    assert set(before.values()) == ({"BF16", "F32"} if family == "deepseek_v3" else {"BF16"})
    assert {k: v for k, v in before.items() if k in after} == after  # every kept tensor keeps its dtype
    assert report["dtype"] == "bfloat16"
    assert (out / "model.safetensors").stat().st_size < source.joinpath("model.safetensors").stat().st_size
    planned = moekit.plan(str(source), "prune-50")  # bf16, DeepSeek-V3's fp32 router included
    assert planned["after"]["bytes"] == report["after"]["bytes"] == (out / "model.safetensors").stat().st_size - (
        8 + int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little"))  # file minus its header
    # the reported quality is that of the weights on disk (refit's fp32 result rounded)
    rows = spread_rows(evaluation_stream(str(workspace / "data"), tokenizer_for(str(out))).input_ids, 512,
                       min(256, tiny_config(family).max_position_embeddings))
    again = _evaluate(moekit.load(out), rows, batch_size=8, progress=False)
    assert again == report["after"]["eval"]


def test_an_fp32_model_can_be_saved_in_bf16(workspace, tmp_path):
    report = _compress(workspace, "mixtral", "reap-50", tmp_path / "out", dtype="bfloat16")
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert report["dtype"] == "bfloat16"
    assert report["before"]["bytes"] == 4 * report["before"]["total_params"]
    assert report["after"]["bytes"] == 2 * report["after"]["total_params"]


def test_bad_inputs_fail_before_work_and_leave_nothing(workspace, tmp_path):
    with pytest.raises(MoekitError, match="fewer than top-k"):
        _compress(workspace, "mixtral", {"steps": [{"type": "prune", "keep": 1}]}, tmp_path / "a")
    with pytest.raises(MoekitError, match="dtype 'int8' is not one of"):
        _compress(workspace, "mixtral", "prune-50", tmp_path / "e", dtype="int8")
    with pytest.raises(MoekitError, match="no such folder"):
        moekit.compress(str(tmp_path / "nope"), "prune-50", out_dir=tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(MoekitError, match="already exists"):
        _compress(workspace, "mixtral", "prune-50", tmp_path / "c")
    with pytest.raises(MoekitError, match="fewer than one sequence"):
        moekit.compress(str(workspace / "mixtral"), "prune-50", out_dir=tmp_path / "d",
                        data=str(workspace / "data"), n_samples=1, seq_len=100000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_interrupted_compression_leaves_no_output_only_its_work_folder(workspace, tmp_path):
    """A failure after the work started (here: inside a step) leaves no output folder, and
    the hidden work folder it names can be resumed (tests/test_resume.py kills for real)."""
    from moekit.io.workdir import work_folder_for
    from moekit.recipe.steps.prune import Prune

    original = Prune.apply_layer

    def boom(self, model, layer, stats, **kw):
        if layer.index == 1:
            raise KeyboardInterrupt
        return original(self, model, layer, stats, **kw)

    Prune.apply_layer = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            _compress(workspace, "mixtral", "prune-50", tmp_path / "out")
    finally:
        Prune.apply_layer = original
    assert [p.name for p in tmp_path.iterdir()] == [work_folder_for(tmp_path / "out").name]
    _compress(workspace, "mixtral", "prune-50", tmp_path / "out", resume=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_compress_json(workspace, tmp_path):
    result = runner.invoke(app, ["compress", str(workspace / "mixtral"), "-r", "prune-50", "-o", str(tmp_path / "o"),
                                 "--data", str(workspace / "data"), "--samples", "4", "--seq-len", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["after"]["experts_per_layer"] == {"0": 4, "1": 4, "2": 4}
    bad = runner.invoke(app, ["compress", str(workspace / "mixtral"), "-r", "nope", "-o", str(tmp_path / "p")])
    assert bad.exit_code == 2 and "not a preset" in bad.output
