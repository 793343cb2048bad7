"""The lm-eval bridge, offline, on a tiny model with its own tokenizer.

Nothing here fakes lm-eval, transformers or torch: the shipped task runs through
lm-eval for real and its accuracy is checked against log-likelihoods scored here
directly with the model.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from moekit.cli import app  # noqa: E402
from moekit.data.shipped import read_shipped  # noqa: E402
from moekit.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from moekit.errors import MoekitError  # noqa: E402
from moekit.eval.harness import load_tasks, offline, parse_task_list, run_tasks  # noqa: E402
from moekit.eval.tasks import shipped_task_names, stage_shipped_tasks  # noqa: E402
from moekit.eval.tasks.stdlib_nexttoken import DATA_FILE, TASK_NAME, build_items, read_items  # noqa: E402
from moekit.zoo.tiny import randomize_, tiny_config  # noqa: E402

N = 40  # items scored: enough that a wrong scoring rule would show, few enough to be quick


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Qwen3-MoE with a BPE trained on part of the evaluation split."""
    tokenizer = train_tokenizer([d.text for d in read_shipped("eval")[:6]], vocab_size=400)
    config = tiny_config("qwen3_moe")
    config.vocab_size = len(tokenizer)
    config.max_position_embeddings = 512  # no item is truncated, as in the hand computation
    model = randomize_(AutoModelForCausalLM.from_config(config)).eval()
    return model, tokenizer


@torch.no_grad()
def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[: len(context_ids)] == context_ids  # the split point is a token boundary
    logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    log_probs = logits[len(context_ids) - 1 : -1].log_softmax(-1)
    return float(log_probs.gather(-1, torch.tensor(whole[len(context_ids) :])[:, None]).sum())


def test_shipped_task_equals_hand_computation(tiny):
    model, tokenizer = tiny
    result = run_tasks(model, tokenizer, TASK_NAME, limit=N, batch_size=4, per_item=True)
    metrics, scored = result.tasks[TASK_NAME], result.items[TASK_NAME]
    assert result.samples == {TASK_NAME: N} and [x["doc_id"] for x in scored] == list(range(N))

    hits, hits_norm = [], []
    for item, lm_eval_item in zip(read_items()[:N], scored):
        # Each candidate is the true line's context followed by "\n" and the candidate line.
        scores = np.array([_loglikelihood(model, tokenizer, item["context"], "\n" + c) for c in item["choices"]])
        np.testing.assert_allclose(lm_eval_item["scores"], scores, rtol=1e-4)
        assert lm_eval_item["target"] == item["label"]
        lengths = np.array([len(c) for c in item["choices"]], dtype=float)
        hits.append(int(scores.argmax()) == item["label"])
        hits_norm.append(int((scores / lengths).argmax()) == item["label"])
    assert metrics["acc"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(np.mean(hits_norm), abs=1e-12)
    assert metrics["acc_stderr"] == pytest.approx(np.std(hits, ddof=1) / np.sqrt(N))


def test_hub_task_fails_with_the_local_yaml_advice():
    with pytest.raises(MoekitError, match="downloads its data from the Hugging Face hub") as info:
        load_tasks("arc_easy")
    assert "local YAML" in str(info.value) and TASK_NAME in str(info.value)
    # and a name lm-eval does not know at all (the built-in index is cached by now)
    with pytest.raises(MoekitError, match="no lm-eval task named 'no_such_task'"):
        load_tasks("no_such_task")


def _write_task(folder, data_files: str, name: str = "my_nexttoken") -> None:
    folder.mkdir(exist_ok=True)
    config = (stage_shipped_tasks(folder.parent / "staged") / f"{TASK_NAME}.yaml").read_text()
    config = config.replace(f"task: {TASK_NAME}", f"task: {name}").replace(str(DATA_FILE.resolve()), data_files)
    (folder / f"{name}.yaml").write_text(config)


def test_user_task_folder(tiny, tmp_path):
    """A task of one's own: a YAML with absolute data paths runs; a relative one is reported."""
    model, tokenizer = tiny
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in read_items()[:6]))
    _write_task(tmp_path / "good", str(data))
    result = run_tasks(model, tokenizer, load_tasks("my_nexttoken", task_paths=[tmp_path / "good"]))
    assert result.samples == {"my_nexttoken": 6} and 0 <= result.tasks["my_nexttoken"]["acc"] <= 1

    _write_task(tmp_path / "bad", "no/such/items.jsonl", name="my_broken")
    with pytest.raises(MoekitError, match="the data of lm-eval task 'my_broken' was not found"):
        load_tasks("my_broken", task_paths=[tmp_path / "bad"])


def test_cli_tasks_rows_and_json(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "model")
    save_tokenizer(tokenizer, tmp_path / "model")
    (tmp_path / "code.py").write_text("def f(x):\n    return x + 1\n" * 60)
    args = ["eval", str(tmp_path / "model"), "--data", str(tmp_path / "code.py"), "--context-length", "64",
            "--stride", "32", "--max-tokens", "200", "--tasks", TASK_NAME, "--limit", "8"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["tasks"] == {"names": [TASK_NAME], "limit": 8, "samples": {TASK_NAME: 8}}
    (scores,) = payload["models"].values()
    expected = run_tasks(model, tokenizer, TASK_NAME, limit=8).tasks[TASK_NAME]
    assert scores["tasks"][TASK_NAME] == pytest.approx(expected)
    assert scores["perplexity"] > 1  # the perplexity evaluation still runs beside the tasks

    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert f"{TASK_NAME} acc_norm" in table.stdout and "±" in table.stdout


def test_cli_refuses_bad_task_options(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--limit", "5"])
    assert result.exit_code == 2 and "add --tasks" in result.output
    result = runner.invoke(app, ["eval", "--tasks", TASK_NAME, "--task-path", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "is not a folder" in result.output


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is absent
    with pytest.raises(MoekitError, match=r"pip install 'moekit\[lmeval\]'"):
        load_tasks(TASK_NAME)


def test_offline_sets_and_restores_hub_flags(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with offline():
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and "HF_DATASETS_OFFLINE" not in os.environ


def test_shipped_data_is_reproducible_and_small(tmp_path):
    assert TASK_NAME in shipped_task_names()
    assert build_items(read_shipped("eval")) == read_items()  # `python scripts/make_eval_tasks.py` output
    assert DATA_FILE.stat().st_size <= 200_000 and len(read_items()) == 300
    # The staged YAML names the data by an absolute path to the package's file.
    staged = (stage_shipped_tasks(tmp_path) / f"{TASK_NAME}.yaml").read_text()
    assert str(DATA_FILE.resolve()) in staged


def test_parse_task_list():
    assert parse_task_list(" a, b ,a") == ["a", "b"]
    assert parse_task_list(["a,b", "c"]) == ["a", "b", "c"]
    with pytest.raises(MoekitError, match="no task names"):
        parse_task_list(" , ")


def test_a_run_outside_a_git_repository_prints_plain_progress_to_a_redirected_stderr(tiny, tmp_path, monkeypatch,
                                                                                    capfd):
    """lm-eval asks git for a commit hash (``fatal: not a git repository`` outside one) and
    draws tqdm bars into files; a log holds neither, but moekit's plain lines: that the
    run started and how far its requests are (it was silent until the results)."""
    model, tokenizer = tiny
    monkeypatch.chdir(tmp_path)
    run_tasks(model, tokenizer, TASK_NAME, limit=4, batch_size=4)
    err = capfd.readouterr().err
    assert "fatal" not in err and "\r" not in err and "%|" not in err, err
    lines = err.splitlines()
    assert lines[0] == f"lm-eval {TASK_NAME}…", err
    assert any(line.startswith("Running loglikelihood requests 16/16 ") for line in lines), err  # 4 items × 4 choices
    run_tasks(model, tokenizer, TASK_NAME, limit=4, batch_size=4, progress=False)
    assert capfd.readouterr().err == ""
