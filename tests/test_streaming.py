"""Streaming one decoder layer at a time from the checkpoint gives bitwise what holding the
whole model in memory gives: statistics, kept experts, saved tensors; broken checkpoints
are refused in one line before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moekit
import moekit.io.load
import moekit.data
from moekit.recipe import load_recipe
from moekit.calib.calibrate import calibrate
from moekit.errors import MoekitError
from moekit.io.checkpoint import Checkpoint
from moekit.io.layered import LayeredModel
from moekit.zoo.tiny import randomize_, tiny_config
from tests.checkpoints import write_checkpoints
from tests.conftest import FAMILIES


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    # small shards: every checkpoint here is sharded, with an index
    return write_checkpoints(tmp_path_factory.mktemp("streaming"), FAMILIES, max_shard_size="20KB")


def _ids(root):
    from moekit.data.tokens import calibration_tokens
    from moekit.io.tokenizer import tokenizer_for

    return calibration_tokens(str(root / "data"), tokenizer_for(str(root / "mixtral")), n_samples=6, seq_len=32,
                              seed=0).input_ids


def test_checkpoints_here_are_sharded(checkpoints):
    assert (checkpoints / "qwen3_moe" / "model.safetensors.index.json").is_file()
    assert len(list((checkpoints / "qwen3_moe").glob("*.safetensors"))) > 3


def test_statistics_streamed_from_disk_equal_those_in_memory(checkpoints, family):
    ids = _ids(checkpoints)
    wanted = ["frequency", "reap", "coactivation", "mean_output", "hidden_sample", "logit_similarity"]
    in_memory = calibrate(moekit.load(checkpoints / family), ids, statistics=wanted, hidden_sample=50,
                          progress=False)
    streamed = calibrate(LayeredModel.from_checkpoint(checkpoints / family), ids, statistics=wanted,
                         hidden_sample=50, progress=False)
    assert in_memory.layers.keys() == streamed.layers.keys()
    for i, stats in in_memory.layers.items():
        for name, tensor in stats.items():
            assert torch.equal(tensor, streamed[i][name]), (i, name)
    assert in_memory.meta["model_fingerprint"] == streamed.meta["model_fingerprint"]


def test_compress_streamed_equals_editing_the_model_in_memory(checkpoints, family, tmp_path):
    """prune-50 (REAP + refit) through the streamed compress, against loading the whole model,
    calibrating it, applying the step to it in memory and saving it with transformers."""
    recipe = load_recipe("prune-50")
    report = moekit.compress(str(checkpoints / family), recipe, out_dir=tmp_path / "streamed",
                             data=str(checkpoints / "data"), n_samples=6, seq_len=32, progress=False,
                             max_shard_size="1KB")  # one shard per decoder layer, and an index
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    model = moekit.load(checkpoints / family)
    step = recipe.steps[0]
    stats = calibrate(model, _ids(checkpoints), statistics=step.needs(), hidden_sample=step.hidden_sample(),
                      progress=False)
    applied = step.apply(model, stats)
    assert applied["kept"] == report["steps"][0]["kept"]
    moekit.save(model, tmp_path / "in-memory")
    streamed, whole = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "in-memory")
    assert streamed.keys() == whole.keys()
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "in-memory" / "config.json").read_text())


def test_a_sharded_output_loads_in_plain_transformers(checkpoints, tmp_path):
    kw = dict(data=str(checkpoints / "data"), n_samples=6, seq_len=32, progress=False)
    moekit.compress(str(checkpoints / "qwen3_moe"), "prune-50", out_dir=tmp_path / "one", **kw)
    moekit.compress(str(checkpoints / "qwen3_moe"), "prune-50", out_dir=tmp_path / "sharded", max_shard_size=1, **kw)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert shards == [f"model-{n:05d}-of-00004.safetensors" for n in range(1, 5)]  # 3 layers and the rest
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = AutoModelForCausalLM.from_pretrained(tmp_path / "one")(ids).logits
        sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")(ids).logits
    assert torch.equal(one, sharded)


def _tensors(folder):
    checkpoint = Checkpoint(folder)
    return checkpoint.read(checkpoint.names())


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_missing_shard_is_named_before_anything_is_written(checkpoints, tmp_path):
    broken = _copy(checkpoints / "qwen3_moe", tmp_path / "broken")
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MoekitError, match=f"names shard {victim.name}.*not in the folder"):
        moekit.compress(str(broken), "prune-50", out_dir=tmp_path / "out", data=str(checkpoints / "data"),
                        n_samples=6, seq_len=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_a_truncated_shard_is_named(checkpoints, tmp_path):
    broken = _copy(checkpoints / "qwen3_moe", tmp_path / "broken")
    victim = sorted(broken.glob("model-*.safetensors"))[2]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(MoekitError, match=f"{victim.name} is truncated.*fetch the shard again"):
        LayeredModel.from_checkpoint(broken)
    victim.write_bytes(b"\x00" * 4)
    with pytest.raises(MoekitError, match=f"{victim.name}: not a readable safetensors file"):
        LayeredModel.from_checkpoint(broken)


def test_a_tensor_that_disagrees_with_the_config_is_named(checkpoints, tmp_path):
    broken = _copy(checkpoints / "qwen3_moe", tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    shard = broken / index[name]
    tensors = load_file(shard)
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(MoekitError, match=f"{shard.name}: tensor '{name}' has shape .* config says"):
        moekit.compress(str(broken), "prune-50", out_dir=tmp_path / "out", data=str(checkpoints / "data"),
                        n_samples=6, seq_len=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


# VmHWM, not ru_maxrss: Linux carries a forking parent's high-water mark into ru_maxrss
# across exec, so under pytest it would report the test runner's own memory.
_PEAK = """
import sys, moekit
moekit.compress(sys.argv[1], "reap-50", out_dir=sys.argv[2], n_samples=4, seq_len=32, progress=False)
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def test_peak_memory_of_a_streamed_compress_does_not_grow_with_depth(tmp_path):
    """16 decoder layers of ~50 MB (fp32) each against 2: holding the model would add 670 MB.
    Streaming adds what the allocator keeps before it plateaus (measured: 2 to 4 layers'
    worth, reached by the fourth layer; flat after it)."""
    import os
    import subprocess
    import sys

    from moekit.data.tokenizer import load_tokenizer

    peaks = {}
    for depth in (2, 16):
        config = tiny_config("qwen3_moe")
        config.update(dict(vocab_size=8192, num_hidden_layers=depth, hidden_size=512, moe_intermediate_size=512,
                           num_experts=16, mlp_only_layers=[], head_dim=64))
        folder = tmp_path / f"depth-{depth}"
        randomize_(AutoModelForCausalLM.from_config(config)).save_pretrained(folder)
        load_tokenizer(moekit.io.load.ZOO_DIR / "ref-fine").save_pretrained(folder)
        done = subprocess.run([sys.executable, "-c", _PEAK, str(folder), str(tmp_path / f"out-{depth}")],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        peaks[depth] = int(done.stdout.split()[-1]) / 1024  # MiB
    layer_mib = 16 * 3 * 512 * 512 * 4 / 2**20
    assert peaks[16] - peaks[2] < 7 * layer_mib, peaks  # half of the 14 more layers holding would add


def test_compress_with_saved_statistics_equals_calibrating(checkpoints, tmp_path):
    """`moekit calibrate` then `compress --stats` gives the bytes a compress that calibrates
    gives; statistics of another model, other data or missing a statistic are refused."""
    from moekit.cli import app
    from typer.testing import CliRunner

    data, model = str(checkpoints / "data"), str(checkpoints / "qwen3_moe")
    common = ["--data", data, "--samples", "6", "--seq-len", "32"]
    cli = CliRunner()
    made = cli.invoke(app, ["calibrate", model, "-o", str(tmp_path / "stats"), "--statistics", "frequency,reap",
                            "--hidden-sample", "8192", *common, "--json"])
    assert made.exit_code == 0, made.output
    kw = dict(data=data, n_samples=6, seq_len=32, progress=False)
    reused = moekit.compress(model, "prune-50", out_dir=tmp_path / "reused", stats=tmp_path / "stats", **kw)
    fresh = moekit.compress(model, "prune-50", out_dir=tmp_path / "fresh", **kw)
    assert reused["steps"] == fresh["steps"]
    assert _tensors(tmp_path / "reused").keys() == _tensors(tmp_path / "fresh").keys()
    assert all(torch.equal(a, b) for a, b in zip(_tensors(tmp_path / "reused").values(),
                                                 _tensors(tmp_path / "fresh").values()))
    for name in ("model.safetensors", "config.json"):  # the checkpoint byte for byte (README says so)
        assert (tmp_path / "reused" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert reused["calibration"][0]["read_from"] == str((tmp_path / "stats").resolve())
    with pytest.raises(MoekitError, match="other calibration data"):
        moekit.compress(model, "prune-50", out_dir=tmp_path / "a", stats=tmp_path / "stats", **{**kw, "seq_len": 16})
    with pytest.raises(MoekitError, match="another model"):
        moekit.compress(str(checkpoints / "mixtral"), "prune-50", out_dir=tmp_path / "b", stats=tmp_path / "stats",
                        **kw)
    with pytest.raises(MoekitError, match=r"needs the statistics \['mean_output'\].*moekit calibrate MODEL --statis"):
        moekit.compress(model, "merge-50", out_dir=tmp_path / "c", stats=tmp_path / "stats", **kw)
    other = _copy(checkpoints / "qwen3_moe", tmp_path / "other")  # same config, other router weights
    shard = json.loads((other / "model.safetensors.index.json").read_text())["weight_map"]["model.layers.0.mlp.gate.weight"]
    tensors = load_file(other / shard)
    tensors["model.layers.0.mlp.gate.weight"] = tensors["model.layers.0.mlp.gate.weight"] * 2
    save_file(tensors, other / shard, metadata={"format": "pt"})
    with pytest.raises(MoekitError, match="layer 0's router differs"):
        moekit.compress(str(other), "prune-50", out_dir=tmp_path / "d", stats=tmp_path / "stats", **kw)
    assert not any((tmp_path / n).exists() for n in "abcd")
