"""Every user error of every command, as a separate process sees it: exit code 2, one line
on stderr that starts with "error:" and names the flag or the file, no traceback, nothing
on stdout, nothing written. The first problem reported is the real one: a model folder
that is not a safetensors checkpoint is refused as such before a tokenizer is asked for.

Each case runs in its own process, forked from a server that imported moekit's command
line (torch, transformers) once: a fresh interpreter per case would spend 4-12 s on
imports alone, for 30 cases, where the check itself takes milliseconds. The child exits
through the same `moekit.cli.main` as the installed `moekit` script, with its own stdout
and stderr, so a traceback, a stray print or a wrong exit code shows as it would in a shell.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moekit.zoo.tiny import tiny_config

SERVER = textwrap.dedent('''
    import json, os, sys, traceback
    import moekit.cli, moekit.io.load  # what every command imports: torch, transformers
    for line in sys.stdin:
        case = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.chdir(case["cwd"])
            for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            sys.argv = ["moekit", *case["args"]]
            if case.get("fsize"):  # "the disk fills up": a write past this many bytes fails with EFBIG
                import resource, signal
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (Python ignores it too) instead of killing
                resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            code = 0
            try:
                moekit.cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()  # what the interpreter prints for an uncaught exception
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
''')


class Moekit:
    """``moekit ARGS`` in a forked process: (exit code, stdout, stderr)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)

    def __call__(self, *args, fsize: int | None = None) -> tuple[int, str, str]:
        """``fsize``: no file may grow past this many bytes (RLIMIT_FSIZE), as if the disk were full."""
        out, err = self.workdir / "stdout", self.workdir / "stderr"
        case = {"args": [str(a) for a in args], "cwd": str(self.workdir), "stdout": str(out), "stderr": str(err),
                "fsize": fsize}
        self.server.stdin.write(json.dumps(case) + "\n")
        self.server.stdin.flush()
        code = int(self.server.stdout.readline())
        return code, out.read_text(), err.read_text()

    def close(self) -> None:
        self.server.kill()  # no state worth a clean exit, which takes torch seconds
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def moekit(tmp_path_factory):
    runner = Moekit(tmp_path_factory.mktemp("cwd"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """One broken input of every kind moekit reads, and the good ones around it."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "pickle-only").mkdir()
    tiny_config("mixtral").save_pretrained(root / "pickle-only")
    torch.save({"w": torch.zeros(2)}, root / "pickle-only" / "pytorch_model.bin")  # a pickle, written by the test
    (root / "no-config").mkdir()
    save_file({"w": torch.zeros(2)}, str(root / "no-config" / "model.safetensors"))
    for name in ("truncated-weights", "bad-config"):
        tiny_config("mixtral").save_pretrained(root / name)
        save_file({"w": torch.zeros(64)}, str(root / name / "model.safetensors"))
    weights = root / "truncated-weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (root / "bad-config" / "config.json").write_text('{"model_type": "mixtral",')
    for suffix in (".txt", ".py", ".md"):
        (root / f"latin1{suffix}").write_bytes("caf\xe9 = 1\n".encode("latin-1") * 50)
    (root / "rows.jsonl").write_text('{"text": "a = 1"}\n{"text": "b = 2"\n')
    (root / "rows.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (root / "recipe.yaml").write_text("steps:\n  - type: prune\n   method: [reap\n")
    (root / "arch.yaml").write_text("family: [olmoe\n")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return root


def _refused(result: tuple[int, str, str], *names: object) -> str:
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    # train reports what it is doing before it reads a corpus; the error is its last line
    assert lines and [line for line in lines if line.startswith("error:")] == lines[-1:], err
    for name in names:
        assert str(name) in lines[-1], lines[-1]
    return lines[-1]


COMMANDS = {  # every command, as it would read MODEL, writing into OUT
    "inspect": ["inspect", "{model}"],
    "calibrate": ["calibrate", "{model}", "-o", "{out}", "--samples", "2", "--seq-len", "16"],
    "eval": ["eval", "{model}", "--max-tokens", "64", "--context-length", "32", "--stride", "16"],
    "compress": ["compress", "{model}", "-o", "{out}", "--samples", "2", "--seq-len", "16"],
    "compress --plan": ["compress", "{model}", "--plan"],
    "train --init": ["train", "--init", "{model}", "-o", "{out}", "--steps", "1", "--seq-len", "16"],
    "analyze": ["analyze", "{model}", "-o", "{out}", "--samples", "2", "--seq-len", "16"],
    "run": ["run", "{model}", "--max-new-tokens", "2"],
    "upcycle": ["upcycle", "{model}", "-o", "{out}"],
    "split": ["split", "{model}", "-o", "{out}", "--samples", "2", "--seq-len", "16"],
    "combine": ["combine", "{model}", "{model}", "-o", "{out}"],
}


def _args(command: str, model: object, out: Path) -> list[str]:
    return [a.format(model=model, out=out) for a in COMMANDS[command]]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("folder, says", [("pickle-only", "pytorch_model.bin"), ("no-config", "no config.json")])
def test_a_folder_that_is_no_checkpoint_is_refused_first(moekit, files, tmp_path, command, folder, says):
    message = _refused(moekit(*_args(command, files / folder, tmp_path / "out")), files / folder, says)
    if folder == "pickle-only":
        assert "safetensors only" in message and "dtype" not in message and "tokenizer" not in message
    assert not (tmp_path / "out").exists()


WRITERS = [command for command, args in COMMANDS.items() if "{out}" in args]
DENSE = "moekit/ref-dense"  # what upcycle, split and combine build from


@pytest.mark.parametrize("command, where, says", [
    *[(command, "{files}/latin1.txt/out", "{files}/latin1.txt is a file, not a folder")  # NotADirectoryError
      for command in WRITERS],
    *[(command, "/proc/moekit-out/out", "/proc takes no new folders") for command in ("compress", "train --init")],
    *[(command, "{files}/latin1.txt", "{files}/latin1.txt is a file; moekit writes its output as a new folder")
      for command in ("calibrate", "train --init")],  # train writes into an existing folder, not into a file
])
def test_an_output_that_cannot_be_created_is_refused_before_any_work(moekit, files, command, where, says):
    """Each of these failed with a traceback after the work, before: the check asks the file
    system itself (root may write wherever the mode bits say no, never under a file or in /proc)."""
    model = DENSE if command in ("upcycle", "split", "combine") else "moekit/tiny-mixtral"
    before = sorted(p.name for p in files.iterdir())
    message = _refused(moekit(*_args(command, model, where.format(files=files))), says.format(files=files))
    assert message.endswith("with -o.")
    assert sorted(p.name for p in files.iterdir()) == before  # the check's probe folder is gone too


@pytest.mark.parametrize("folder, file", [("truncated-weights", "model.safetensors"), ("bad-config", "config.json")])
@pytest.mark.parametrize("command", ["inspect", "compress", "train --init"])
def test_an_unreadable_checkpoint_file_is_named(moekit, files, tmp_path, command, folder, file):
    _refused(moekit(*_args(command, files / folder, tmp_path / "out")), files / folder / file)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, flag",
    [
        (["calibrate", "--samples", "0"], "--samples"),
        (["calibrate", "--batch-size", "many"], "--batch-size"),
        (["eval", "--stride", "0"], "--stride"),
        (["eval", "--max-tokens", "-5"], "--max-tokens"),
        (["eval", "--context-length", "64", "--stride", "64"], "--stride 64 must be below --context-length 64"),
        (["compress", "--seq-len", "1"], "--seq-len"),
        (["compress", "--seed", "-1"], "--seed"),
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--warmup", "-1"], "--warmup"),
        # lengths the model has no positions for, from its config, before any data is read
        (["calibrate", "moekit/tiny-mixtral", "--seq-len", "512"], "--seq-len 512 is beyond the 256 positions"),
        (["eval", "moekit/tiny-mixtral", "--context-length", "512"], "--context-length 512 is beyond the 256"),
        (["compress", "moekit/tiny-mixtral", "--seq-len", "300"], "--seq-len 300 is beyond the 256 positions"),
    ],
)
def test_a_numeric_flag_out_of_range_is_refused_before_any_work(moekit, tmp_path, args, flag):
    writes = [] if args[0] == "eval" else ["-o", tmp_path / "out"]
    _refused(moekit(*args, *writes), flag)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, file",
    [
        (["calibrate", "moekit/tiny-mixtral", "--data", "{files}/latin1.txt"], "latin1.txt"),
        (["eval", "moekit/tiny-mixtral", "--data", "{files}/latin1.py"], "latin1.py"),
        (["compress", "moekit/tiny-mixtral", "--data", "{files}/latin1.md"], "latin1.md"),
        (["calibrate", "moekit/tiny-mixtral", "--data", "{files}/rows.jsonl"], "rows.jsonl:2"),
        (["eval", "moekit/tiny-mixtral", "--data", "{files}/rows.parquet"], "rows.parquet"),
        (["train", "--data", "{files}/rows.parquet"], "rows.parquet"),
        (["compress", "moekit/tiny-mixtral", "--recipe", "{files}/recipe.yaml"], "recipe.yaml"),
        (["compress", "moekit/tiny-mixtral", "--plan", "--recipe", "{files}/recipe.yaml"], "recipe.yaml"),
        (["calibrate", "moekit/tiny-mixtral", "--tokenizer", "{files}/tokenizer"], "tokenizer/tokenizer.json"),
        (["train", "--arch", "{files}/arch.yaml"], "arch.yaml"),
    ],
)
def test_a_corrupt_input_file_is_named(moekit, files, tmp_path, args, file):
    writes = [] if args[0] == "eval" or "--plan" in args else ["-o", tmp_path / "out"]
    _refused(moekit(*[a.format(files=files) for a in args], *writes), files / file.partition(":")[0], file)
    assert not (tmp_path / "out").exists()


def test_a_jsonl_field_that_is_missing_points_at_a_flag_the_command_has(moekit, files, tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"content": "a = 1"}\n')
    for command in ("calibrate", "eval", "compress", "train"):
        model = [] if command == "train" else ["moekit/tiny-mixtral"]
        writes = [] if command == "eval" else ["-o", tmp_path / "out"]
        _refused(moekit(command, *model, "--data", tmp_path / "rows.jsonl", *writes), "--text-field")
        code, help_text, _ = moekit(command, "--help")
        assert code == 0 and "--text-field" in help_text, command


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    """A real 4-bit compressed-tensors checkpoint, as `compress --recipe w4a16` writes one."""
    import moekit
    from tests.checkpoints import write_checkpoints

    root = write_checkpoints(tmp_path_factory.mktemp("quantized"), ["qwen3_moe"], documents=2)
    moekit.compress(str(root / "qwen3_moe"), {"steps": [{"type": "quantize", "method": "rtn", "bits": 4,
                                                         "group_size": 8}]},
                    out_dir=root / "w4", data=str(root / "data"), n_samples=2, seq_len=16, dtype="bfloat16",
                    progress=False)
    return root / "w4"


@pytest.mark.parametrize("command, fix", [
    ("compress", "--dequantize"), ("compress --plan", "--dequantize"), ("train --init", "moekit compress RUN/model"),
    ("upcycle", "moekit compress OUT"), ("split", "moekit compress OUT"), ("combine", "moekit compress OUT")])
def test_a_quantized_input_is_refused_by_every_command_that_writes_weights(moekit, quantized, tmp_path, command,
                                                                            fix):
    """Read dequantized, its weights would be written as floats: the output would silently
    lose the quantization and grow several times (a 4-bit model compressed to 2x its bytes)."""
    message = _refused(moekit(*_args(command, quantized, tmp_path / "out")), quantized,
                       "quantized checkpoint (compressed-tensors, 4-bit weights)", fix)
    if command.startswith("compress"):
        assert "recipe that ends in quantize" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_quantized_input_is_counted_as_stored_and_dequantize_says_so(moekit, quantized, tmp_path):
    from moekit.io.checkpoint import Checkpoint

    code, out, err = moekit("inspect", quantized, "--json")
    assert code == 0, err
    assert json.loads(out)["total_bytes"] == Checkpoint(quantized).stored_bytes  # not its dequantized floats
    assert set(json.loads(out)["bytes_by_dtype"]) == {"bfloat16", "int32", "int64"}  # scales, packed, shapes
    code, out, err = moekit("compress", quantized, "--plan", "--dequantize", "--recipe", "reap-25", "--json")
    assert code == 0, err
    planned = json.loads(out)
    assert planned["before"]["bytes"] == Checkpoint(quantized).stored_bytes  # packed, not the floats read
    assert any("quantized checkpoint (compressed-tensors, 4-bit weights), read dequantized (--dequantize)" in note
               for note in planned["notes"])


def test_compress_says_who_loads_its_output_and_the_experts_per_token(moekit, quantized, tmp_path):
    """Not an error, but the CLI's account of a routing policy (tests/test_who_loads.py checks
    each claim in plain transformers): the weights load anywhere, the policy only in moekit."""
    root = quantized.parent
    code, out, err = moekit("compress", root / "qwen3_moe", "--recipe", "skip-50", "-o", tmp_path / "out",
                            "--data", root / "data", "--samples", "2", "--seq-len", "16")
    assert code == 0, err
    words = " ".join(out.split())
    assert "experts / token │ 2 │ 1 (routing policy; mean on the" in words  # the table wraps the cell
    assert "but transformers ignores the routing policy (config.json's `moekit_routing_policy`)" in words
    assert "so its results differ from this model's. `moekit.load(folder)` applies the policy" in words


def test_run_refuses_statistics_of_another_model_with_as_many_experts(moekit, quantized, tmp_path):
    """The prior's statistics are checked by the fingerprint calibrate wrote (config and
    routers), as compress --stats checks them: one changed router is another model."""
    from transformers import AutoModelForCausalLM

    from moekit.data.tokenizer import load_tokenizer, save_tokenizer

    root = quantized.parent
    other = AutoModelForCausalLM.from_pretrained(root / "qwen3_moe")
    other.model.layers[0].mlp.gate.weight.data[0] += 1.0
    other.save_pretrained(tmp_path / "other")
    save_tokenizer(load_tokenizer(root / "qwen3_moe"), tmp_path / "other")
    code, _, err = moekit("calibrate", root / "qwen3_moe", "-o", tmp_path / "stats", "--data", root / "data",
                          "--samples", "2", "--seq-len", "16", "--stats", "frequency")
    assert code == 0, err
    run = ["--prompt", "def", "--max-new-tokens", "2", "--expert-memory", "100%", "--stats", tmp_path / "stats"]
    message = _refused(moekit("run", tmp_path / "other", "--policy", "prior", *run), tmp_path / "stats",
                       "were computed on another model")
    assert "moekit calibrate MODEL -o FOLDER" in message
    _refused(moekit("run", root / "qwen3_moe", *run), "--stats is read only by --policy prior (not lru)")
    code, _, err = moekit("run", root / "qwen3_moe", "--policy", "prior", *run)
    assert code == 0, err
