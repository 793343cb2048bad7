"""Options the commands that build an MoE from dense models share (upcycle, split, combine)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli._options import SEED_MAX

Dense = Annotated[str, typer.Argument(help="A dense checkpoint folder (Qwen3, Llama or Mistral).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="New folder for the MoE checkpoint.")]
TopK = Annotated[int, typer.Option("--top-k", min=1, help="Experts each token is routed to.")]
Seed = Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the router and of any random choice.")]
JsonOut = Annotated[bool, typer.Option("--json", is_eager=True, help="Print JSON for scripts.")]
