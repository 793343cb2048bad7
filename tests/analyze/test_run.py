"""`moekit.analyze` (one layer-streamed pass) against brute force: an ordinary full forward
whose MoE-block inputs are captured, routed by each layer, and counted token by token
with the definitions written out; and a model whose routing is set by hand."""

from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit.analyze import analyze
from moekit.errors import MoekitError
from moekit.zoo.tiny import tiny_model

GEN = torch.Generator().manual_seed(1)
DATA = {"low": torch.randint(3, 120, (8, 64), generator=GEN), "high": torch.randint(200, 380, (8, 64), generator=GEN)}


def _block_inputs(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    captured, hooks = {}, []
    for layer in moekit.moe_layers(model):
        hooks.append(layer.block.register_forward_pre_hook(
            lambda _m, args, i=layer.index: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return captured


@pytest.fixture(scope="module")
def case():
    model = tiny_model("qwen3_moe")  # MoE layers 0 and 2 (layer 1 dense): "next" skips a layer
    result = analyze(model, DATA, batch_size=3, position_buckets=4, prefetch_tokens=300, progress=False)
    ids = torch.cat(list(DATA.values()))
    return model, result, ids, _block_inputs(model, ids)


def test_every_statistic_equals_brute_force(case):
    model, result, ids, inputs = case
    layers = moekit.moe_layers(model)
    assert [r["layer"] for r in result.layers] == [layer.index for layer in layers] == [0, 2]
    flat_ids = ids.reshape(-1).tolist()
    T = len(flat_ids)
    rows, S = ids.shape
    corpus_of_row = [0] * 8 + [1] * 8
    fit_row = [r % 2 == 0 for r in range(8)] * 2
    previous = None
    for layer, got in zip(layers, result.layers):
        E, k = layer.num_experts, layer.top_k
        with torch.no_grad():
            _, logits, index, weights = layer.forward(inputs[layer.index])
        sel = [set(index[t].tolist()) for t in range(T)]
        first_of = [int(index[t, 0]) for t in range(T)]  # the first-ranked expert
        count = [sum(j in s for s in sel) for j in range(E)]
        assert got["load"]["count"] == count
        gate = [sum(float(weights[t, i]) for t in range(T) for i in range(k) if index[t, i] == j) for j in range(E)]
        assert got["load"]["gate_share"] == pytest.approx([g / sum(gate) for g in gate], rel=1e-5)
        p = torch.softmax(logits.double(), -1)
        entropy = float(-(p * p.log()).sum(-1).mean())
        assert got["load"]["entropy"] == pytest.approx(entropy, rel=1e-5)
        coact = [[sum(i in s and j in s for s in sel) for j in range(E)] for i in range(E)]
        assert got["coactivation"]["counts"] == coact
        # token ids: a lookup fitted on even rows, scored on odd rows
        fit, test = {}, []
        for t, v in enumerate(flat_ids):
            if fit_row[t // S]:
                for j in sel[t]:
                    fit.setdefault(v, [0] * E)[j] += 1
        overall = [sum(c[j] for c in fit.values()) for j in range(E)]
        fallback = set(sorted(range(E), key=lambda j: (-overall[j], j))[:k])
        for t, v in enumerate(flat_ids):
            if not fit_row[t // S]:
                lookup = set(sorted(range(E), key=lambda j: (-fit[v][j], j))[:k]) if v in fit else fallback
                test.append(len(lookup & sel[t]) / k)
        assert got["tokens"]["lookup_agreement"] == pytest.approx(sum(test) / len(test), rel=1e-9)
        # positions (4 buckets of 16) and corpora
        for b in range(4):
            assert got["position"]["counts"][b] == [sum(j in sel[t] for t in range(T) if (t % S) // 16 == b)
                                                    for j in range(E)]
        for d in range(2):
            assert got["domains"]["counts"][d] == [sum(j in sel[t] for t in range(T) if corpus_of_row[t // S] == d)
                                                   for j in range(E)]
        if previous is None:
            assert "from_previous" not in got
        else:
            prev_layer, prev_sel, prev_first = previous
            nxt = got["from_previous"]
            assert nxt["previous_layer"] == prev_layer.index
            joint = [[sum(i in prev_sel[t] and j in sel[t] for t in range(T)) for j in range(E)] for i in range(E)]
            assert nxt["joint"] == joint
            scored = list(range(0, T, 4))  # at most 300 of 1024 tokens: every 4th
            with torch.no_grad():  # this layer's router on the previous MoE layer's block input
                _, _, guess, _ = layer.forward(inputs[prev_layer.index][scored])
            recall = sum(len(set(guess[i].tolist()) & sel[t]) for i, t in enumerate(scored)) / (len(scored) * k)
            assert nxt["prefetch_recall"] == pytest.approx(recall, rel=1e-9) and nxt["prefetch_tokens"] == 256
            P = torch.tensor(joint, dtype=torch.float64) / (T * k * k)
            mi = sum(float(P[i, j] * math.log2(P[i, j] / (P[i].sum() * P[:, j].sum())))
                     for i in range(E) for j in range(E) if P[i, j] > 0)
            assert nxt["mutual_information_bits"] == pytest.approx(mi, rel=1e-9)
            first = [[sum(prev_first[t] == i and first_of[t] == j for t in range(T)) for j in range(E)]
                     for i in range(E)]
            assert nxt["joint_top1"] == first
        previous = (layer, sel, first_of)


def _hand_routed(seed: int = 0):
    """Mixtral whose routing is set by hand: attention and experts output 0, so every
    layer's MoE block sees the embedding; token v's embedding is e_(v mod 8) + ½ e_(v+1 mod 8)
    and every router reads those 8 dimensions, so token v goes to experts v mod 8 and
    v+1 mod 8 at every layer, whatever its context."""
    model = tiny_model("mixtral", seed=seed)
    E = 8
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            if name.endswith("o_proj.weight") or name.endswith("experts.down_proj"):
                param.zero_()
        emb = model.get_input_embeddings().weight
        emb.zero_()
        v = torch.arange(emb.shape[0])
        emb[v, v % E] = 1.0
        emb[v, (v + 1) % E] = 0.5
        for layer in moekit.moe_layers(model):
            layer.router.weight.zero_()
            layer.router.weight[:, :E] = 10 * torch.eye(E)
    return model


def test_hand_routed_model_gives_known_numbers():
    model = _hand_routed()
    E = 8
    rows = torch.arange(64).repeat(8, 1) + 8  # tokens 8..71 at positions 0..63, every row alike
    data = {"zero": rows.clone(), "four": (rows // 8) * 8 + 4}  # corpus "four": only ids ≡ 4 (mod 8)
    result = analyze(model, data, batch_size=4, progress=False)
    for layer in result.layers:
        # corpus "zero": each residue 8 times per row; "four": always experts 4 and 5
        count = [8 * 8 * 2] * E
        count[4] += 8 * 64
        count[5] += 8 * 64
        assert layer["load"]["count"] == count
        assert layer["coactivation"]["counts"][4][5] == 8 * 8 + 8 * 64
        assert layer["coactivation"]["counts"][0][1] == 8 * 8 and layer["coactivation"]["counts"][0][2] == 0
        assert layer["tokens"]["lookup_agreement"] == 1.0  # routing is the token id
        assert layer["tokens"]["mean_concentration"] == 1.0
        assert layer["domains"]["specific"]["four"][0]["expert"] in (4, 5)
        for j, tied in enumerate(layer["tokens"]["per_expert"]):  # every occurrence of these ids goes to j
            assert tied and all(t["share"] == 1.0 and t["id"] % E in (j, (j - 1) % E) for t in tied)
        assert layer["tokens"]["per_expert"][4][0]["count"] == 8 + 8 * 8  # id ≡ 4 in both corpora, most seen
        if "from_previous" in layer:
            assert layer["from_previous"]["prefetch_recall"] == 1.0  # the same router on the same input
            assert layer["from_previous"]["mutual_information_top1_normalized"] == pytest.approx(1.0)
            joint = torch.tensor(layer["from_previous"]["joint"])
            assert joint.sum() == 2 * 8 * 64 * 2 * 2  # k·k pairs per token
    assert result.summary["token_lookup_agreement"] == 1.0 and result.summary["prefetch_recall"] == 1.0


def test_streamed_from_checkpoint_equals_in_memory(tmp_path, case):
    model, result, _, _ = case
    model.save_pretrained(tmp_path / "m")
    from moekit.io.layered import LayeredModel

    from moekit.calib.activations import ActivationBudget

    spill = ActivationBudget(0, tmp_path / "spill")  # hidden states in files, one batch in memory at a time
    streamed = analyze(LayeredModel.from_checkpoint(tmp_path / "m"), DATA, batch_size=3, position_buckets=4,
                       prefetch_tokens=300, progress=False, activations=spill)
    assert spill.spilled
    for a, b in zip(result.layers, streamed.layers):
        assert a["load"]["count"] == b["load"]["count"] and a["coactivation"]["counts"] == b["coactivation"]["counts"]
        assert a.get("from_previous", {}).get("joint") == b.get("from_previous", {}).get("joint")
        assert a["tokens"]["lookup_agreement"] == b["tokens"]["lookup_agreement"]


def test_refusals():
    model = tiny_model("mixtral")
    with pytest.raises(MoekitError, match="at least 512 tokens"):
        analyze(model, {"small": torch.randint(3, 100, (2, 100))}, progress=False)
    with pytest.raises(MoekitError, match="not one of the corpora"):
        analyze(model, DATA, focus="nope", progress=False)
    with pytest.raises(MoekitError, match="vocabulary"):
        analyze(model, {"big": torch.full((4, 200), 5000)}, progress=False)
    with pytest.raises(MoekitError, match="one width"):
        analyze(model, {"a": DATA["low"], "b": torch.randint(3, 100, (4, 200))}, progress=False)
    from transformers import AutoModelForCausalLM, Qwen3Config

    dense = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=384, hidden_size=32, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=1, head_dim=16))
    with pytest.raises(MoekitError, match="not a Mixture-of-Experts"):
        analyze(dense, DATA, progress=False)


def test_moekit_analyze_is_callable_whatever_was_imported_first():
    """``moekit.analyze`` names the package too: after ``import moekit.analyze.report`` the
    public call must still work."""
    import moekit.analyze.report  # noqa: F401

    result = moekit.analyze(tiny_model("mixtral"), DATA["low"], progress=False)
    assert result.corpora[0]["name"] == "data" and result.summary["moe_layers"] == 3
