"""The options of every command that streams a model layer by layer (calibrate, compress,
eval), declared once, and the one place that turns them into a `LayeredModel`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Device = Annotated[str, typer.Option(
    help="Where each layer computes: auto (a GPU when there is one), cpu, cuda, cuda:N, mps.")]
ComputeDtype = Annotated[str, typer.Option(
    help="Compute precision: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.")]
def size_option(value: str | None) -> str | None:
    """Checked while the command line is parsed (one line naming the flag), kept as text."""
    if value is None:
        return None
    from moekit.devices import parse_bytes
    from moekit.errors import MoekitError

    try:
        parse_bytes(value)
    except MoekitError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


ActivationBudget = Annotated[Optional[str], typer.Option(
    parser=size_option, metavar="SIZE", help="Hidden states of all rows kept in memory up to this size (e.g. 4GiB); above it they go to files "
         "(compress: in its work folder); 0 keeps none in memory. Default: 2GiB.")]

DEFAULT_ACTIVATION_BUDGET = "2GiB"


def open_streamed(name: str, device: str, compute_dtype: str):
    """The model ``name`` lent one decoder layer at a time on ``device``."""
    from moekit.devices import resolve_compute_dtype, resolve_device
    from moekit.io.load import open_model

    where = resolve_device(device)
    return open_model(name, dtype=resolve_compute_dtype(compute_dtype, where), device=where)


def budget(value: str | None, folder=None):
    """An `ActivationBudget` from the option's value."""
    from moekit.calib.activations import ActivationBudget as Budget
    from moekit.devices import parse_bytes

    return Budget(parse_bytes(value or DEFAULT_ACTIVATION_BUDGET), folder)
