"""The generation-speed harness runs on a model of every family as it is."""

import pytest
import torch

from moekit.errors import MoekitError
from moekit.eval.speed import decode_step, measure_speed, returned_cache
from moekit.zoo.tiny import tiny_model
from tests.conftest import FAMILIES


def test_measure_speed_on_every_family():
    for family in FAMILIES:
        model = tiny_model(family).train()
        before = {n: p.clone() for n, p in model.state_dict().items()}
        result = measure_speed(model, prefill=12, decode=3, runs=3, warmup=0, batch_size=2)
        assert model.training  # left as it was
        assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
        assert len(result.prefill_seconds) == len(result.decode_seconds) == 3
        assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
        assert sorted(result.decode_seconds)[1] == pytest.approx(2 * 3 / result.decode_tokens_per_s, abs=1e-6)
        assert result.threads == torch.get_num_threads() and result.machine["cpu_count"] >= 1
        assert set(result.to_dict()) >= {"prefill_tokens_per_s", "decode_tokens_per_s", "machine", "threads"}


def test_measure_speed_refuses_more_tokens_than_positions():
    with pytest.raises(MoekitError, match="exceed the model's 256 positions"):
        measure_speed(tiny_model("mixtral"), prefill=250, decode=10)


def test_measure_speed_takes_a_real_prompt():
    prompt = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    result = measure_speed(tiny_model("qwen3_moe"), prompt=prompt, decode=2, runs=1, warmup=0)
    assert (result.prefill_tokens, result.batch_size, result.decode_tokens) == (9, 2, 2)


def test_a_decode_step_reads_the_cache_on_every_family():
    """The step `measure_speed` times continues from the cache: its last logits are the
    full forward's (a cache passed by a keyword the forward does not take, such as
    ``cache=`` before late transformers 5.x, is dropped silently and the step sees one token)."""
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    for family in FAMILIES:
        model = tiny_model(family)
        with torch.no_grad():
            full = model(ids).logits[:, -1]
            step, _ = decode_step(model, ids[:, -1:], returned_cache(model(ids[:, :-1], use_cache=True)))
        torch.testing.assert_close(step.logits[:, -1], full, rtol=0, atol=1e-4, msg=family)  # without: off by ~10
