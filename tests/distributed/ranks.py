"""Run a function on several torch.distributed ranks (gloo, CPU), each a process started
the way torchrun starts one: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in its environment, then `moekit.distributed.init`. One thread per process.

The functions are module-level (spawned processes import them) and return what the test
compares; ``run_ranks`` gives back each rank's return value or its error as a line.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(target, rank: int, size: int, port: int, dist_timeout: float, out: str, args: tuple, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    torch.set_num_threads(1)
    import moekit.distributed as distributed

    start = time.monotonic()
    try:
        distributed.init(timeout=dist_timeout)
        result = {"result": target(rank, *args, **kwargs)}
    except BaseException as exc:  # noqa: BLE001 - the test reads what each rank ended with
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.monotonic() - start
    torch.save(result, Path(out) / f"rank{rank}.pt")
    distributed.finish()


def run_ranks(target, size: int, *args, dist_timeout: float = 30.0, timeout: float = 120.0, **kwargs) -> list[dict]:
    """``target(rank, *args, **kwargs)`` on ``size`` ranks. Each entry: {"result": ...} or {"error":
    "Type: message"}, with "seconds" (from joining the group to the end) — or
    {"exitcode": n} for a rank that died without a word."""
    # fork: a rank starts with moekit, torch and transformers already imported (a spawned
    # one spends 10-25 s importing them on a busy 2-core machine). Safe here: the parent
    # has joined no group and runs torch with one thread (no OpenMP pool to inherit).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="moekit-ranks-") as out:
        procs = [ctx.Process(target=_child, args=(target, rank, size, port, dist_timeout, out, args, kwargs))
                 for rank in range(size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():  # a hang is a failure of the test, not something to wait out
                os.kill(p.pid, signal.SIGKILL)
                p.join()
        results = []
        for rank, p in enumerate(procs):
            file = Path(out) / f"rank{rank}.pt"
            results.append(torch.load(file, weights_only=False) if file.exists() else {"exitcode": p.exitcode})
        return results


# -- what the ranks run ---------------------------------------------------------------------
STATISTICS = ["frequency", "soft_frequency", "reap", "ean", "man", "msan", "peak", "coactivation",
              "logit_similarity", "mean_output", "hidden_sample", "routing_weights", "topk_error", "topk_mass"]


def rows(root: Path, n: int = 6, length: int = 32) -> torch.Tensor:
    """Fixed token rows of the tiny model's vocabulary."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(root / "model").vocab_size
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def calibrate_and_evaluate(rank: int, root: Path, batch_size: int = 2) -> dict:
    """Every statistic of 6 rows of 32 tokens (a hidden sample of 100 of their 192 tokens),
    and the perplexity of a 200-token stream in windows of 16."""
    import moekit
    from moekit.eval.perplexity import evaluate
    from moekit.io.layered import LayeredModel

    stats = moekit.calibrate(LayeredModel.from_checkpoint(root / "model"), rows(root), statistics=STATISTICS,
                             batch_size=batch_size, hidden_sample=100, seed=3, progress=False)
    result = evaluate(LayeredModel.from_checkpoint(root / "model"), rows(root, 5, 40).flatten(), context_length=16,
                      stride=8, batch_size=batch_size + 1, progress=False)
    return {"stats": stats.layers, "tokens": stats.tokens, "eval": result.to_dict()}


def compress(rank: int, root: Path, recipe, out: Path, kill_after: int | None = None, resume: bool = False,
             hang: bool = False, samples: int = 6) -> dict:
    """`moekit.compress` on the tiny checkpoint (``recipe``: one, or one per rank);
    ``kill_after``: rank 1 SIGKILLs itself once it has finished that layer (a real kill -9
    at a known point), or with ``hang`` stops answering there for 5 s first."""
    import moekit

    def on_event(name: str, index: int) -> None:
        if kill_after is not None and rank == 1 and name == "layer" and index == kill_after:
            if hang:  # long enough for the others' timeout (the tests set 2 s), short enough for CI
                time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)

    recipe = recipe[rank] if isinstance(recipe, list) else recipe
    report = moekit.compress(str(root / "model"), recipe, out_dir=out, data=str(root / "data"), n_samples=samples,
                             seq_len=32, batch_size=2, evaluate=True, eval_data=str(root / "data"),
                             eval_max_tokens=256 * max(samples, 4), progress=False, resume=resume, on_event=on_event)
    return {"steps": report.get("steps"), "before": report["before"], "after": report.get("after"), "out": report["out"]}


def command(rank: int, argv: list[str]) -> dict:
    """``moekit ARGV`` as torchrun runs it on each rank (`moekit.cli.main`): its exit code and
    what it printed on stdout."""
    import contextlib
    import io
    import sys

    from moekit.cli import main

    printed = io.StringIO()
    sys.argv = ["moekit", *argv]
    code = 0
    with contextlib.redirect_stdout(printed):
        try:
            main()
        except SystemExit as exc:
            code = exc.code or 0
        text = printed.getvalue() if sys.stdout is printed else ""  # ranks other than 0 print into /dev/null
    return {"code": code, "stdout": text}


def progress_agreement(rank: int, folder: Path, finished: list[list[int]]) -> list[int] | str:
    """A work folder per rank with layers ``finished[rank]`` committed, then
    `agree_progress`: the layers each rank then counts as finished."""
    from moekit.distributed import current
    from moekit.distributed.runs import agree_progress
    from moekit.errors import MoekitError
    from moekit.io.workdir import WorkFolder

    work = WorkFolder(folder / f"rank{rank}", {"run": 1}, resume=False)
    work.keep_previous = True
    for index in finished[rank]:
        work.hidden_folder(index).mkdir()
        work.commit(index, {})
    try:
        agree_progress(WorkFolder(work.path, {"run": 1}, resume=True), current())
    except MoekitError as exc:
        return str(exc)
    return work.finished_layers()


def hessian(rank: int, size: int) -> torch.Tensor:
    """GPTQ's Hessian of 6 batches of inputs, this rank adding its share, then combined."""
    from moekit.distributed import current, my_batches
    from moekit.methods.quantize.gptq import HessianAccumulator

    batches = torch.randn(6, 40, 16, generator=torch.Generator().manual_seed(0))
    accumulator = HessianAccumulator(16)
    for b in my_batches(len(batches), current()):
        accumulator.add(batches[b])
    if size > 1:
        accumulator.reduce(current())
    return accumulator.finish()
