"""What the commands say, as a shell sees it: messages printed whole (brackets included),
errors naming the flags typed, bad values refused while the command line is parsed, a
config.json that does not describe its weights refused by every command, `-o` required
wherever a command writes, and help that reads as one (no Python type names)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.errors import MoekitError
from moekit.io.load import load
from moekit.zoo.tiny import TINY_TOKENIZER_DIR
from tests.cli.test_errors import _args, _refused, moekit as moekit  # noqa: F401  (the forked runner)

TINY = "moekit/tiny-qwen3_moe"
README = Path(__file__).resolve().parents[2] / "README.md"
REFERENCE_MODELS = README.parent / "docs" / "reference-models.md"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE saved as a checkpoint folder (8 experts per layer), and two copies
    whose config.json does not describe the weights: one says 12 experts, one gives the
    expert count under two names with different values."""
    root = tmp_path_factory.mktemp("models")
    load(TINY).save_pretrained(root / "model")
    for f in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy(f, root / "model" / f.name)
    config = json.loads((root / "model" / "config.json").read_text())
    from transformers import AutoConfig

    alias, name = next((a, n) for a, n in type(AutoConfig.for_model("qwen3_moe")).attribute_map.items()
                       if n in config and isinstance(config[n], int))
    for folder, changes in (("wider", {name: config[name] + 4}), ("two-names", {alias: config[name] + 12})):
        shutil.copytree(root / "model", root / folder)
        (root / folder / "config.json").write_text(json.dumps({**config, **changes}))
    (root / "names.json").write_text(json.dumps([alias, name, config[name]]))
    return root


def test_brackets_in_messages_are_printed(moekit, tmp_path):
    """Rich reads ``[word]`` as markup and drops it: a folder named ``run[v2]`` vanished from
    its own error, the ``[n, H]`` shape from --list-stats."""
    message = _refused(moekit("inspect", tmp_path / "run[v2]"))
    assert f"no such folder: {tmp_path / 'run[v2]'}." in message
    code, out, _ = moekit("calibrate", "--list-stats")
    assert code == 0 and "hidden_sample: [n, H] a seeded" in out


def test_the_missing_lm_eval_hint_names_the_extra(monkeypatch):
    """With lm-eval not importable (a ``sys.modules`` entry of None makes its import raise
    ImportError), the hint gives the whole install command; the CLI prints a message's
    brackets as they are (`test_brackets_in_messages_are_printed`)."""
    from moekit.eval.harness import load_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MoekitError) as refused:
        load_tasks("moekit_stdlib_nexttoken")
    assert str(refused.value).endswith("install it with: pip install 'moekit[lmeval]' (in a source checkout: "
                                       "pip install -e '.[lmeval]')")


def test_the_docs_say_to_install_lm_eval_before_their_task_commands():
    """The reference models' comparison (docs/reference-models.md) says it in the paragraph
    before the command; the README's table row, in the row itself."""
    text = REFERENCE_MODELS.read_text()
    command = text.index("moekit eval moekit/ref-fine moekit/ref-coarse --tasks")
    assert 'pip install -e ".[lmeval]"' in text[text.rindex("\n\n", 0, command - 10):command]
    row = next(line for line in README.read_text().splitlines() if "--tasks moekit_stdlib_nexttoken" in line)
    assert row.index('pip install -e ".[lmeval]"') < row.index("moekit eval --tasks")
    assert 'lmeval = [' in (README.parent / "pyproject.toml").read_text()


def test_calibrate_names_its_statistics_with_statistics(moekit, tmp_path):
    """--stats is a folder in compress and run; calibrate's list is --statistics, and the
    old spelling still works, with a line saying so."""
    _refused(moekit("calibrate", TINY, "--statistics", "vibes", "-o", tmp_path / "s"), "unknown statistics")
    code, _, err = moekit("calibrate", TINY, "--stats", "vibes", "-o", tmp_path / "s")
    lines = [line for line in err.strip().splitlines() if not line.startswith("threads: ")]  # its first line
    assert code == 2 and len(lines) == 2 and "unknown statistics" in lines[1]
    assert lines[0].startswith("note: calibrate's --stats is now --statistics")
    assert not (tmp_path / "s").exists()
    help_text = moekit("calibrate", "--help")[1]
    assert "--statistics" in help_text and "--stats " not in help_text


def test_run_errors_name_flags(moekit, folders):
    for args, says in [
        ([TINY, "--expert-memory", "1000"], "--expert-memory (1,000 bytes) is less than every MoE layer's top-k"),
        ([folders / "model", "--slow-tier", "ssd"], "--slow-tier ssd is not one of disk, memory."),
        ([folders / "model", "--compute-misses", "always"],
         "--compute-misses always computes missed experts from their copy in CPU memory, and this model's experts "
         "are read from disk; add --slow-tier memory (RAM for every routed expert) or use --compute-misses never."),
        ([TINY, "--cache-dtype", "int8"], "--cache-dtype int8 is not a floating-point dtype"),
    ]:
        message = _refused(moekit("run", *args, "--max-new-tokens", "1", "--threads", "1"), says)
        assert not re.search(r"\b(expert_memory|slow_tier|compute_misses|cache_dtype)\b", message), message


def test_a_share_of_expert_memory_is_checked_while_parsing(moekit, tmp_path):
    """Before the model is even looked for: the flag is refused, not the missing folder."""
    _refused(moekit("run", tmp_path / "absent", "--expert-memory", "150%"),
             "Invalid value for '--expert-memory': '150%' is not a share of the routed experts in (0%, 100%]")


@pytest.mark.parametrize("command", ["upcycle", "split", "combine"])
def test_seed_is_range_checked_by_the_commands_that_build(moekit, tmp_path, command):
    _refused(moekit(*_args(command, "moekit/ref-dense", tmp_path / "out"), "--seed", "-1"),
             "Invalid value for '--seed'")
    assert not (tmp_path / "out").exists()


def test_a_recipe_check_names_the_file_and_the_step(moekit, tmp_path):
    recipe = tmp_path / "nine.yaml"
    recipe.write_text("steps:\n  - type: prune\n    method: reap\n    keep: 4\n  - type: quantize\n    bits: 9\n")
    message = _refused(moekit("compress", TINY, "--plan", "--recipe", recipe))
    assert message == (f"error: {recipe}: step 2 (quantize): bits: 9 bits is not supported; choose an integer "
                       "number of bits from 2 to 8")


# the check is in `check_model`, which every command runs first (test_errors.py); inspect and
# eval accepted such a config, silently using one of the two values
@pytest.mark.parametrize("command", ["inspect", "eval", "calibrate", "run"])
def test_a_config_with_two_values_for_one_setting_is_refused(moekit, folders, tmp_path, command):
    alias, name, count = json.loads((folders / "names.json").read_text())
    _refused(moekit(*_args(command, folders / "two-names", tmp_path / "out")), folders / "two-names" / "config.json",
             f"gives {alias} {count + 12} and {name} {count}, two names of one qwen3_moe setting")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["inspect", "eval", "train --init"])
def test_a_config_that_does_not_describe_the_weights_is_refused(moekit, folders, tmp_path, command):
    """inspect and train --init loaded it through transformers, which failed with a traceback."""
    _refused(moekit(*_args(command, folders / "wider", tmp_path / "out")),
             "tensor 'model.layers.0.mlp.gate.weight' has shape (8, 32) but the config says (12, 32)")
    assert not (tmp_path / "out").exists()


def test_inspect_describes_a_dense_model(moekit):
    code, out, err = moekit("inspect", "moekit/ref-dense")
    flat = " ".join(out.split())
    assert code == 0 and err == "", err
    assert "moekit/ref-dense — Qwen3ForCausalLM (qwen3): 4 decoder layers, every one dense" in flat
    assert "no routed experts: a dense model; `moekit upcycle` or `moekit split` builds an MoE from it." in flat
    code, out, _ = moekit("inspect", "moekit/ref-dense", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["routed_params"] == 0 and summary["active_params"] == summary["total_params"] > 0
    assert [layer["kind"] for layer in summary["layers"]] == ["dense"] * 4


@pytest.mark.parametrize("command", ["calibrate", "analyze", "train"])
def test_every_command_that_writes_needs_o(moekit, tmp_path, command):
    """No default folder (./stats, ./routing-report, runs/train) is written into: the
    output is refused missing while the command line is parsed, before the model is looked at."""
    args = [command, *(["--init"] if command == "train" else []), tmp_path / "absent"]
    _refused(moekit(*args), "Missing option '--out' / '-o'.")
    assert not any((moekit.workdir / name).exists() for name in ("stats", "routing-report", "runs"))


def test_help_shows_words_not_python_types_and_whole_paragraphs(tmp_path):
    """One process renders every help at 400 columns: no ``<bool>``/``<str>`` anywhere, and
    each command's line in the list of commands is its whole first docstring paragraph."""
    from moekit.cli import app
    from typer.main import get_command

    commands = get_command(app).commands
    every = [["--help"], *[[name, "--help"] for name in commands]]
    probe = f"from moekit.cli import app\nfor args in {every!r}:\n    app(args, standalone_mode=False)\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 0, done.stderr
    assert not re.search(r"<(bool|str|int|float|path|list)", done.stdout), done.stdout
    listed = {line.split("│")[1].split(maxsplit=1)[0]: line.split("│")[1].split(maxsplit=1)[1].strip()
              for line in done.stdout.split("Commands")[1].split("╰")[0].splitlines() if line.startswith("│")}
    for name, command in commands.items():
        assert listed[name] == " ".join(command.help.split("\n\n")[0].split()), name
    assert re.search(r"--samples\s+INTEGER \[x>=1\]\s+Calibration sequences", done.stdout)
    assert re.search(r"--json\s+Print", done.stdout)  # a flag takes no value: nothing between it and its help
