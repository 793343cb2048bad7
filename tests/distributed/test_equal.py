"""Two and four gloo ranks give what one process gives: statistics, evaluation, and the
checkpoints `prune-50` and `merge-50` write.

Stated tolerance: each rank pushes whole batches of a single process's (`moekit.distributed
.shard`), so per-token values are bit for bit the same and only the order of float64
additions differs (per rank, then across ranks). Sums may thus differ by float64 rounding,
relative 1e-12, which at most flips the last bit of the float32 they are stored in:
statistics are compared with rtol 1e-6; counts, maxima, the hidden sample and the chosen
routing weights must be identical, and so must the kept experts. The saved tensors are
compared with the same float32 tolerance (in practice they come out bitwise identical).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoints import write_checkpoints
from tests.distributed import ranks

EXACT = {"frequency", "peak", "hidden_sample", "routing_weights", "coactivation"}
RTOL = 1e-6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = write_checkpoints(tmp_path_factory.mktemp("distributed"), ["qwen3_moe"], documents=4)
    (root / "qwen3_moe").rename(root / "model")  # 3 decoder layers, the middle one dense
    return root


def _same_statistics(one: dict, many: dict) -> None:
    assert many["tokens"] == one["tokens"]
    assert many["stats"].keys() == one["stats"].keys()
    for index, layer in one["stats"].items():
        assert many["stats"][index].keys() == layer.keys()
        for name, expected in layer.items():
            got = many["stats"][index][name]
            if name in EXACT:
                assert torch.equal(got, expected), (index, name)
            else:
                torch.testing.assert_close(got, expected, rtol=RTOL, atol=1e-12, msg=f"layer {index} {name}")


def _same_evaluation(one: dict, many: dict) -> None:
    assert many["tokens"] == one["tokens"] and many["accuracy"] == one["accuracy"]
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-12)
    for a, b in zip(one["layers"], many["layers"], strict=True):
        assert b["load"] == a["load"] and b["entropy"] == pytest.approx(a["entropy"], rel=1e-12)


@pytest.mark.parametrize("size, batch_size", [(2, 2), (4, 1)])
def test_statistics_and_evaluation_equal_one_process(root, size, batch_size):
    one = ranks.calibrate_and_evaluate(0, root, batch_size)
    results = ranks.run_ranks(ranks.calibrate_and_evaluate, size, root, batch_size)
    assert all("result" in r for r in results), results
    for r in results:  # every rank holds the combined statistics, not its share
        _same_statistics(one, r["result"])
        _same_evaluation(one["eval"], r["result"]["eval"])


def test_fewer_batches_than_ranks_is_refused(root):
    results = ranks.run_ranks(ranks.calibrate_and_evaluate, 4, root, 2)  # 3 batches of 2 rows
    assert all("3 batch(es) of rows cannot be shared by 4 ranks" in r.get("error", "") for r in results), results


# a planning pass (global budget) and a second calibration; a drop chosen by measured loss
GLOBAL = {"steps": [{"type": "prune", "method": "frequency", "keep": 4, "budget": "global"}, {"type": "merge", "keep": 3}]}
DROP = {"steps": [{"type": "drop_blocks", "count": 1, "criterion": "loss"}]}


@pytest.mark.parametrize("recipe, size", [("prune-50", 2), ("merge-50", 2), ("prune-50", 4), (GLOBAL, 2), (DROP, 2)],
                         ids=["prune-50", "merge-50", "prune-50-4-ranks", "global-then-merge", "drop-by-loss"])
def test_compress_equals_one_process(root, tmp_path, recipe, size):
    one = ranks.compress(0, root, recipe, tmp_path / "one", samples=4 * size)
    results = ranks.run_ranks(ranks.compress, size, root, recipe, tmp_path / "two", samples=4 * size)
    assert all("result" in r for r in results), results
    main, other = results[0]["result"], results[-1]["result"]
    assert main["steps"] == one["steps"]  # the same experts kept (and merged), with the same scores
    assert main["before"]["eval"] == one["before"]["eval"] and main["after"]["eval"] == one["after"]["eval"]
    assert other["out"] is None and sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 0 wrote
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert files and sorted(p.name for p in (tmp_path / "two").glob("*.safetensors")) == files
    for file in files:
        expected, got = load_file(tmp_path / "one" / file), load_file(tmp_path / "two" / file)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=RTOL, atol=1e-7, msg=name)


def test_gptq_hessians_and_quantized_model_across_ranks(root, tmp_path):
    """GPTQ's Hessians are float32 sums: combined across ranks they equal one process's to
    float32 reduction order (rtol 1e-5), which can move a scale by an ulp and flip a few
    roundings downstream, so the quantized model is close to, not bitwise, one process's;
    the experts kept before it are the same and every rank holds the same edit."""
    expected = ranks.hessian(0, 1)
    for r in ranks.run_ranks(ranks.hessian, 2, 2):
        torch.testing.assert_close(r["result"], expected, rtol=1e-5, atol=1e-6)
    recipe = {"steps": [{"type": "prune", "method": "reap", "keep": 4},
                        {"type": "quantize", "bits": 4, "group_size": 8, "router_repair": True}]}
    one = ranks.compress(0, root, recipe, tmp_path / "one", samples=8)
    two = ranks.run_ranks(ranks.compress, 2, root, recipe, tmp_path / "two", samples=8)[0]["result"]
    assert two["steps"][0] == one["steps"][0]  # the same experts kept
    assert two["after"]["eval"]["perplexity"] == pytest.approx(one["after"]["eval"]["perplexity"], rel=0.03)


def test_routing_policy_target_equals_one_process(root, tmp_path):
    one = ranks.compress(0, root, "skip-50", tmp_path / "one", samples=8)
    two = ranks.run_ranks(ranks.compress, 2, root, "skip-50", tmp_path / "two", samples=8)[0]["result"]
    assert two["steps"] == one["steps"] and two["after"]["eval"] == one["after"]["eval"]
    assert (tmp_path / "two" / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()
