"""`moekit eval --max-tokens N` on ref-fine: its windows spread over the whole `stdlib:eval`
split (what the CLI does) against the first N tokens (what it did before), and the whole
split, all with the CLI's default windows (256 tokens, stride 128).

    python benchmarks/eval_max_tokens.py [--model moekit/ref-fine] [--threads 1]

Prints one line per N and the machine facts; the numbers in docs/commands.md come from it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from datetime import date

WINDOWS = {"context_length": 256, "stride": 128, "routing": False, "progress": False}  # the CLI's defaults


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="moekit/ref-fine")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    args = parser.parse_args()

    import torch

    import moekit
    from moekit.data.tokens import evaluation_stream
    from moekit.io.load import open_model
    from moekit.io.tokenizer import tokenizer_for

    torch.set_num_threads(args.threads)
    stream = evaluation_stream("stdlib:eval", tokenizer_for(args.model)).input_ids
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{args.model}, {platform.machine()}, {os.cpu_count()} cores, {date.today()}, commit {commit}, "
          f"threads {args.threads}, load {os.getloadavg()[0]:.1f}")
    for n in args.tokens:
        spread = moekit.evaluate(open_model(args.model), stream, max_tokens=n, **WINDOWS)
        first = moekit.evaluate(open_model(args.model), stream[:n], **WINDOWS)
        print(f"{n:>7,} tokens: spread {spread.perplexity:.2f} ({spread.tokens:,} scored), "
              f"first N {first.perplexity:.2f} ({first.tokens:,} scored)")
    whole = moekit.evaluate(open_model(args.model), stream, **WINDOWS)
    print(f"whole split: {whole.perplexity:.2f} ({whole.tokens:,} scored)")


if __name__ == "__main__":
    main()
