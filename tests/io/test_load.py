"""Loading: shipped names, local folders, and every bad input a user gives."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import moekit
from moekit.errors import MoekitError
from moekit.io.load import default_model, reference_names


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_names_load_and_are_listed():
    model = moekit.load("moekit/tiny-mixtral")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert "moekit/tiny-mixtral" in reference_names()
    assert default_model() in reference_names()


def test_unknown_tiny_name_lists_the_choices():
    with pytest.raises(MoekitError, match="moekit/tiny-mixtral"):
        moekit.load("moekit/tiny-nope")


def test_unknown_reference_name():
    with pytest.raises(MoekitError, match="not shipped"):
        moekit.load("moekit/ref-huge")


def test_local_roundtrip(tmp_path):
    model = moekit.load("moekit/tiny-qwen2_moe")
    moekit.save(model, tmp_path / "m")
    again = moekit.load(tmp_path / "m")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_folder(tmp_path):
    with pytest.raises(MoekitError, match="no such folder"):
        moekit.load(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(MoekitError, match="is a file"):
        moekit.load(tmp_path / "model.safetensors")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(MoekitError, match="no config.json"):
        moekit.load(tmp_path)


def test_pickle_only_checkpoint_is_refused_and_untouched(tmp_path):
    model = moekit.load("moekit/tiny-olmoe")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle, written by the test
    before = _digest(tmp_path)
    with pytest.raises(MoekitError, match="pickle") as err:
        moekit.load(tmp_path)
    assert "arbitrary code" in str(err.value) and "pytorch_model.bin" in str(err.value)
    assert _digest(tmp_path) == before


def test_config_without_weights(tmp_path):
    moekit.load("moekit/tiny-olmoe").config.save_pretrained(tmp_path)
    with pytest.raises(MoekitError, match="no \\*.safetensors"):
        moekit.load(tmp_path)


def test_remote_code_is_not_run_unless_asked(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mystery",
        "auto_map": {"AutoConfig": "configuration_mystery.MysteryConfig",
                     "AutoModelForCausalLM": "modeling_mystery.MysteryModel"},
    }))
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (tmp_path / "configuration_mystery.py").write_text(code)
    (tmp_path / "modeling_mystery.py").write_text(code)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MoekitError, match="--trust-remote-code"):
        moekit.load(tmp_path)
    assert not marker.exists()


def test_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(MoekitError, match="pass the local folder"):
        moekit.load("someone/some-moe")
    assert time.monotonic() - start < 10


def test_stored_dtype_is_read_from_the_safetensors_headers(tmp_path):
    from moekit.io.load import stored_dtype

    model = moekit.load("moekit/tiny-mixtral")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.to(torch.float32).save_pretrained(tmp_path / "fp32")
    assert stored_dtype(tmp_path / "bf16") == torch.bfloat16
    assert stored_dtype(tmp_path / "fp32") == torch.float32
    assert stored_dtype("moekit/tiny-mixtral") == torch.float32  # built in memory, fp32
    assert stored_dtype("moekit/ref-fine") == torch.bfloat16


def test_save_in_bf16_keeps_the_model_computing_in_fp32_with_the_saved_values(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = moekit.load("moekit/tiny-deepseek_v3")
    moekit.save(model, tmp_path / "m", dtype=torch.bfloat16)
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    # what transformers keeps in fp32 at bf16 (the correction bias; the router too from 5.24)
    keep = type(model)._keep_in_fp32_modules_strict
    assert "e_score_correction_bias" in keep
    assert {k for k, v in dtypes.items() if v == "F32"} == {k for k in dtypes if any(m in k for m in keep)}
    assert set(dtypes.values()) == {"F32", "BF16"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_every_entry_point_reports_a_pickle_only_folder_as_such(tmp_path):
    from moekit.io.load import check_model, load_config, resolve_folder, stored_dtype

    moekit.load("moekit/tiny-olmoe").config.save_pretrained(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")  # a pickle, written by the test
    for entry in (check_model, load_config, resolve_folder, stored_dtype, moekit.load):
        with pytest.raises(MoekitError, match="pickle format \\(pytorch_model.bin\\)"):
            entry(tmp_path)


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"model_type": "olmoe",', r"config.json is not valid JSON \(line 1, column 24"),
        ('["olmoe"]', r"config.json does not hold a JSON object"),
        ('{"hidden_size": 8}', r"config.json has no model_type"),
        ('{"model_type": "olmoe-9000"}', r"config.json has model_type 'olmoe-9000', which this transformers does not"),
    ],
)
def test_an_unreadable_config_is_named(tmp_path, config, message):
    from moekit.io.load import load_config

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(config)
    for entry in (load_config, moekit.load):
        with pytest.raises(MoekitError, match=message):
            entry(tmp_path)


def test_a_truncated_weights_file_is_named_before_anything_is_read(tmp_path):
    from moekit.io.load import check_model, stored_dtype

    moekit.save(moekit.load("moekit/tiny-olmoe"), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    assert check_model(tmp_path / "m") == tmp_path / "m" and check_model("moekit/tiny-olmoe") is None
    weights.write_bytes(weights.read_bytes()[:-1000])
    for entry in (check_model, stored_dtype, moekit.load):
        with pytest.raises(MoekitError, match=r"model.safetensors is not a readable safetensors file \(.*\); download"):
            entry(tmp_path / "m")
