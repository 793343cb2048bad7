"""The quantize step end to end: every family compresses to a compressed-tensors checkpoint
that plain transformers (separate process, no moekit) and moekit load to the same logits;
GPTQ beats round to nearest; stages follow the layer's calls; an expert that receives no
token still gets finite scales; bad settings are refused before any weight is read."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import moekit
from moekit.arch.discover import family_of, view_layer
from moekit.errors import MoekitError
from moekit.methods.quantize.sequential import stages, target_linears
from tests.checkpoints import write_checkpoints
from tests.conftest import FAMILIES
from tests.reload import plain_logits

# experts stored as one 3-D tensor in their checkpoints: no per-Linear format for them
FUSED_ON_DISK = {"gpt_oss", "granitemoe", "granitemoeshared", "llama4"}
QUANTIZABLE = [f for f in FAMILIES if f not in FUSED_ON_DISK]
W4 = {"type": "quantize", "bits": 4, "group_size": 8}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("quantize"), FAMILIES, documents=4)


def _compress(sources, family, out, step, **options):
    return moekit.compress(str(sources / family), {"steps": [step]}, out_dir=out, data=str(sources / "data"),
                           n_samples=4, seq_len=32, progress=False, **options)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_every_family_saves_a_checkpoint_plain_transformers_loads_as_moekit_does(sources, tmp_path):
    """GPTQ of every family (groups of 128 halved to fit the widths): the output is
    pack-quantized (int32 weights, per-expert names), plain transformers + compressed-tensors
    and `moekit.load` give equal logits, closer to the original model's at 8 bits than at 4."""
    ids = torch.randint(3, 290, (2, 16), generator=torch.Generator().manual_seed(0))
    outs = {}
    for family in QUANTIZABLE:
        for bits in (4, 8):
            outs[family, bits] = tmp_path / f"{family}-{bits}"
            # groups of 128 fitted to the widths: Linears and experts often get different sizes
            step = {**W4, "bits": bits, "group_size": 128, "fit_group_size": True}
            report = _compress(sources, family, outs[family, bits], step)
            assert report["steps"][0]["experts"], family
    plain = plain_logits(tmp_path, list(outs.values()), ids)
    errors = {}
    for ((family, bits), out), theirs in zip(outs.items(), plain, strict=True):
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
        assert "compressed-tensors` package is installed" in (out / "README.md").read_text()
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            names = set(f.keys())
        assert any(".experts.0." in n and n.endswith("weight_packed") for n in names), family
        assert not any(n.endswith("proj.weight") and ".experts." in n for n in names), family
        ours = _logits(moekit.load(out), ids)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=family)
        original = _logits(moekit.load(sources / family), ids)
        errors[family, bits] = float((ours - original).norm() / original.norm())
    # Tiny random routers have near ties, so one flipped choice moves the logits by a step
    # (DeepSeek-V3's groups; Qwen3-Next's recurrent state carries it to every later token):
    # a bound on the error would test the model's chaos, not the quantizer. Bits must help.
    for family in QUANTIZABLE:
        assert errors[family, 8] < errors[family, 4], (family, errors[family, 8], errors[family, 4])


def test_a_bf16_output_loads_in_plain_transformers_as_moekit_loads_it(sources, tmp_path):
    """Every family quantized from bf16: plain transformers at the checkpoint's dtype (its
    default) and `moekit.load(dtype=bf16)` give the same logits, bit for bit, without a
    loader warning (a bf16 `moekit.load` once rounded the rotary frequencies to bf16,
    where transformers keeps them in float32)."""
    ids = torch.randint(3, 290, (2, 16), generator=torch.Generator().manual_seed(2))
    outs = [tmp_path / family for family in QUANTIZABLE]
    for family, out in zip(QUANTIZABLE, outs):
        _compress(sources, family, out, W4, dtype="bfloat16")
    for family, out, theirs in zip(QUANTIZABLE, outs, plain_logits(tmp_path, outs, ids, dtype="auto"), strict=True):
        assert theirs.dtype == torch.bfloat16, family
        torch.testing.assert_close(_logits(moekit.load(out, dtype=torch.bfloat16), ids), theirs, rtol=0, atol=0,
                                   msg=family)


def test_more_bits_and_gptq_are_closer_to_the_original(sources, tmp_path):
    """On the calibration text, GPTQ's output error is below round to nearest's at 3 bits,
    and 8 bits is closer than 3."""
    family = "qwen3_moe"
    from moekit.data.tokens import calibration_tokens
    from moekit.io.tokenizer import tokenizer_for

    ids = calibration_tokens(str(sources / "data"), tokenizer_for(str(sources / family), None), n_samples=4,
                             seq_len=32, seed=0).input_ids
    original = _logits(moekit.load(sources / family), ids)

    def error(step):
        out = tmp_path / f"{step['method']}-{step['bits']}"
        _compress(sources, family, out, step)
        return float(((_logits(moekit.load(out), ids) - original) ** 2).mean())

    gptq3 = error({**W4, "bits": 3, "method": "gptq", "expert_calibration": "all"})
    rtn3 = error({**W4, "bits": 3, "method": "rtn"})
    gptq8 = error({**W4, "bits": 8, "method": "gptq", "expert_calibration": "all"})
    assert gptq3 < rtn3
    assert gptq8 < 0.05 * gptq3


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_stages_follow_the_calls_and_group_linears_that_share_an_input(family):
    model = moekit.load(f"moekit/tiny-{family}")
    index = 1 if family == "qwen2_moe" else 0  # the tiny Qwen2-MoE's layer 0 is dense
    layer = family_of(model).decoder_layers(model)[index]
    view = view_layer(model, index)
    linears = target_linears(layer, view)
    assert "mlp.gate" not in linears  # the router stays
    hidden = torch.randn(1, 5, model.config.hidden_size)
    position = model.model.rotary_emb(hidden, torch.arange(5)[None])

    def run(stack):
        layer(hidden, position_embeddings=position, attention_mask=None)

    order = stages(layer, view, linears, run)
    assert order[:2] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    if family == "qwen2_moe":  # the shared expert reads the block's input, then its down projection
        assert order[2] == ["moe block", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"]
        assert order[3] == ["mlp.shared_expert.down_proj"]
    else:
        assert order[2:] == [["moe block"]]


def test_an_expert_that_receives_no_token_gets_finite_scales(sources, tmp_path):
    """DeepSeek-V3's selection-only correction bias of expert 3 is pushed far down so no
    token chooses it: with min_tokens 0 its Hessian is zero (GPTQ rounds to nearest, and
    says so); by default it falls back to the all-token Hessian. Either way every saved
    scale is finite and positive."""
    from moekit.io.tokenizer import tokenizer_for

    family = "deepseek_v3"
    source = tmp_path / "source"
    model = moekit.load(sources / family)
    for layer in moekit.moe_layers(model):
        layer.router.correction_bias[3] = -1e4
    model.save_pretrained(source)
    tokenizer_for(str(sources / family), None).save_pretrained(source)
    for min_tokens in (0, 16):
        out = tmp_path / f"min-{min_tokens}"
        report = moekit.compress(str(source), {"steps": [{**W4, "min_tokens": min_tokens}]}, out_dir=out,
                                 data=str(sources / "data"), n_samples=4, seq_len=32, progress=False)["steps"][0]
        for layer, tokens in report["tokens"].items():
            assert tokens[3] == 0
            assert (3 in report["fallback"][layer]) == (min_tokens > 0)
        if min_tokens == 0:
            notes = [note for layer_notes in report["notes"].values() for note in layer_notes]
            assert any("identity" in note or "nearest" in note for note in notes), notes
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            for name in f.keys():
                if name.endswith("weight_scale"):
                    scale = f.get_tensor(name).float()
                    assert torch.isfinite(scale).all() and (scale > 0).all(), name


@pytest.mark.parametrize(("step", "message"), [
    ({"bits": 1}, "1 bits is not supported"),
    ({"bits": 9}, "9 bits is not supported"),
    ({"expert_bits": 1}, "expert_bits"),
    ({"group_size": 12}, "group size 12 does not divide"),
])
def test_bad_settings_are_refused_before_weights_load(sources, tmp_path, step, message):
    with pytest.raises(MoekitError, match=message):
        _compress(sources, "qwen3_moe", tmp_path / "out", {**W4, **step})
    assert not (tmp_path / "out").exists()


def test_families_with_experts_fused_on_disk_are_refused_with_the_way_out(sources, tmp_path):
    for family in sorted(FUSED_ON_DISK):
        with pytest.raises(MoekitError, match="targets: \\[linear\\]"):
            _compress(sources, family, tmp_path / family, W4)
    report = _compress(sources, "gpt_oss", tmp_path / "linear", {**W4, "targets": ["linear"]})
    assert "experts" not in report["steps"][0]


def test_the_packed_bytes_are_what_the_scheme_says(sources, tmp_path):
    """Each saved Linear takes exactly `QuantScheme.packed_bytes`, its scales in the
    output's dtype (bf16 here)."""
    from moekit.methods.quantize.scheme import QuantScheme

    out = tmp_path / "out"
    _compress(sources, "mixtral", out, W4, dtype="bfloat16")
    scheme = QuantScheme(4, 8)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        modules = {n.rsplit(".", 1)[0] for n in f.keys() if n.endswith("weight_packed")}
        for module in modules:
            shape = f.get_tensor(f"{module}.weight_shape").tolist()
            stored = sum(math.prod(f.get_slice(f"{module}.{part}").get_shape()) * size
                         for part, size in (("weight_packed", 4), ("weight_scale", 2), ("weight_shape", 8)))
            assert f.get_tensor(f"{module}.weight_scale").dtype == torch.bfloat16
            assert stored == scheme.packed_bytes(*shape, scale_bytes=2), module


@pytest.mark.parametrize("preset", ["w4a16", "prune-50-w4"])
def test_the_plan_gives_the_bytes_the_checkpoint_has(sources, tmp_path, preset):
    """`moekit.plan` counts the packed checkpoint exactly, before any weight is read."""
    planned = moekit.plan(str(sources / "qwen3_moe"), preset, dtype="bfloat16")
    report = moekit.compress(str(sources / "qwen3_moe"), preset, out_dir=tmp_path / "out", dtype="bfloat16",
                             data=str(sources / "data"), n_samples=4, seq_len=32, progress=False)
    stored = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert planned["after"]["bytes"] == report["after"]["bytes"] <= stored < report["after"]["bytes"] + 65536
    assert planned["after"]["quantization"][0]["group_size"] == 16  # 128 halved until it divides 16 and 32


def test_mixed_precision_meets_the_byte_budget_and_each_expert_keeps_its_bits(sources, tmp_path):
    """average_bits 3: the experts' bits (chosen across all layers by the MILP) fit the bytes
    of every expert at 3 bits; each expert is packed at its own width and `moekit.load`
    decompresses it with its own scheme (at most 2**bits values per scale group); plain
    transformers, which would decompress them all with one scheme, refuses the folder."""
    from moekit.arch.edit import skeleton
    from moekit.io.load import load_config
    from moekit.methods.quantize.allocate import budget_for_average_bits
    from moekit.recipe.steps.quantize import Quantize

    step = {**W4, "average_bits": 3.0}
    report = _compress(sources, "qwen3_moe", tmp_path / "out", step)["steps"][0]
    bits = {(int(i), j): b for i, layer in report["bits"].items() for j, b in enumerate(layer)}
    assert set(bits.values()) <= {2, 3, 4, 8} and len(set(bits.values())) > 1
    quantize = Quantize.model_validate(step)
    costs = quantize.expert_costs(skeleton(load_config(str(sources / "qwen3_moe"))))
    assert sum(costs[key][b] for key, b in bits.items()) <= budget_for_average_bits(costs, 3.0)
    allocation = report["allocation"]  # what the solver proved, carried into the step's report
    assert allocation["proven_optimal"] and allocation["mip_gap"] <= allocation["within"] == 1e-4
    assert allocation["total_bytes"] == sum(costs[key][b] for key, b in bits.items())
    assert allocation["budget_bytes"] == budget_for_average_bits(costs, 3.0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "moekit.load" in config["moekit_note"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Load it with `moekit.load(folder)`" in card
    # transformers would decompress every expert with the first group's 4 bits: it must refuse
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    model = moekit.load(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "moekit-model.safetensors"), framework="pt") as f:
        for (i, j), b in bits.items():
            packed = f.get_slice(f"model.layers.{i}.mlp.experts.{j}.down_proj.weight_packed").get_shape()
            assert packed[1] == math.ceil(16 * b / 32)  # down: 16 inputs per row
    for layer in moekit.moe_layers(model):
        for j in range(layer.num_experts):
            groups = layer.experts.down[j].reshape(-1, 8)  # one row's group of 8 columns shares a scale
            most = max(len(set(g.tolist())) for g in groups)
            assert most <= 2 ** bits[layer.index, j], (layer.index, j)


@pytest.mark.parametrize(("step", "message"), [
    ({"average_bits": 1.5}, "outside bit_options"),
    ({"average_bits": 2.5, "bit_options": [3, 8]}, "outside bit_options"),
    ({"average_bits": 3.0, "expert_bits": 4}, "drop expert_bits"),
])
def test_bad_mixed_precision_budgets_are_refused_before_weights_load(sources, tmp_path, step, message):
    with pytest.raises(MoekitError, match=message):
        _compress(sources, "qwen3_moe", tmp_path / "out", {**W4, **step})


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_router_repair_never_lowers_the_topk_agreement_and_saves_the_refitted_router(sources, tmp_path, family):
    """At 2 bits the quantized inputs flip routing choices; the re-fitted router agrees with
    the original model's choices at least as often (on the calibration tokens), and the
    checkpoint holds it."""
    step = {**W4, "bits": 2, "router_repair": True}
    report = _compress(sources, family, tmp_path / "out", step)["steps"][0]
    agreement = report["topk_agreement"]
    assert agreement and all(0 < before <= after <= 1 for before, after in agreement.values())
    assert any(after > before for before, after in agreement.values())
    original, repaired = moekit.load(sources / family), moekit.load(tmp_path / "out")
    changed = [i for i, (before, after) in agreement.items() if after > before]
    routers = {layer.index: layer.router.weight for layer in moekit.moe_layers(repaired)}
    for layer in moekit.moe_layers(original):
        assert torch.equal(layer.router.weight, routers[layer.index]) != (str(layer.index) in changed)


def test_moekit_eval_reads_a_quantized_checkpoint_as_moekit_load_does(sources, tmp_path):
    """`moekit eval` streams the packed checkpoint (decompressed layer by layer) to the same
    perplexity as the model `moekit.load` builds whole."""
    from typer.testing import CliRunner

    from moekit.cli import app

    out = tmp_path / "out"
    _compress(sources, "qwen3_moe", out, W4)
    result = CliRunner().invoke(app, ["eval", str(out), "--data", str(sources / "data"), "--context-length", "32",
                                      "--stride", "16", "--max-tokens", "300", "--json"])
    assert result.exit_code == 0, result.output
    (streamed,) = json.loads(result.stdout)["models"].values()
    from moekit.data.tokens import evaluation_stream
    from moekit.io.tokenizer import tokenizer_for

    ids = evaluation_stream(str(sources / "data"), tokenizer_for(str(out), None)).input_ids
    whole = moekit.evaluate(moekit.load(out), ids, context_length=32, stride=16, max_tokens=300, progress=False)
    assert streamed["perplexity"] == pytest.approx(whole.perplexity, rel=1e-5)


def test_merge_then_quantize_composes_into_a_checkpoint_plain_transformers_loads(sources, tmp_path):
    ids = torch.randint(3, 290, (2, 16), generator=torch.Generator().manual_seed(1))
    out = tmp_path / "out"
    report = moekit.compress(str(sources / "qwen3_moe"), {"steps": [{"type": "merge", "keep": 6}, W4]}, out_dir=out,
                             data=str(sources / "data"), n_samples=4, seq_len=32, progress=False)
    assert set(report["after"]["experts_per_layer"].values()) == {6}
    (theirs,) = plain_logits(tmp_path, [out], ids)
    torch.testing.assert_close(_logits(moekit.load(out), ids), theirs, rtol=0, atol=1e-5)


def test_a_quantized_input_is_compressed_only_on_purpose_and_the_report_says_so(sources, tmp_path):
    """A pack-quantized checkpoint is read dequantized: compressing it is refused unless
    asked for (``dequantize``); then the report, its notes and the card say the output
    stores floats, and "before" counts the input's packed bytes, not its floats."""
    from moekit.io.checkpoint import Checkpoint

    w4 = tmp_path / "w4"
    _compress(sources, "qwen3_moe", w4, W4, dtype="bfloat16")
    prune = {"type": "prune", "method": "reap", "remove": 0.25}
    with pytest.raises(MoekitError, match=r"is a quantized checkpoint \(compressed-tensors, 4-bit weights\).*"
                                          r"recipe that ends in quantize.*--dequantize"):
        moekit.compress(str(w4), {"steps": [prune]}, out_dir=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    report = moekit.compress(str(w4), {"steps": [prune]}, out_dir=tmp_path / "out", data=str(sources / "data"),
                             n_samples=4, seq_len=32, progress=False, dequantize=True)
    assert report["before"]["bytes"] == Checkpoint(w4).stored_bytes < report["after"]["bytes"]
    (note,) = [n for n in report["notes"] if "read dequantized" in n]
    assert "stores bfloat16 weights" in note and note in (tmp_path / "out" / "README.md").read_text()
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
