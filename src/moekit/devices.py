"""Where work computes and in what precision: ``--device`` and ``--compute-dtype``.

On CPUs bf16/fp16 matmuls run 8–100x slower than fp32 (measured on moekit's development
machines), so CPU work computes in fp32; on a GPU, bf16 with statistics accumulated in
fp32 (the observers accumulate in float64). Outputs keep the source checkpoint's dtype
whatever the compute dtype (`moekit.io.save.output_dtype`).
"""

from __future__ import annotations

import torch

from moekit.errors import MoekitError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        MoekitError: a device this machine does not have, or a name torch does not know.
    """
    if isinstance(choice, torch.device):
        return choice
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise MoekitError(f"--device {choice!r} is not a device name; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MoekitError(f"--device {choice}: this machine has no CUDA GPU that torch can use "
                              f"(torch {torch.__version__}); use --device cpu.")
        if device.index is not None and device.index >= count:
            raise MoekitError(f"--device {choice}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}.")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MoekitError(f"--device {choice}: MPS is not available on this machine; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise MoekitError(f"--device {choice}: moekit computes on cpu, cuda or mps.")
    return device


def resolve_compute_dtype(choice: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on the CPU, bf16 on a GPU; or one of `COMPUTE_DTYPES` by name."""
    if isinstance(choice, torch.dtype):
        return choice
    choice = choice or "auto"
    if choice == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if choice not in COMPUTE_DTYPES:
        raise MoekitError(f"--compute-dtype {choice!r} is not one of auto, {', '.join(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[choice]


def parse_bytes(value: str | int | None) -> int | None:
    """``"4GiB"``, ``"512MB"``, ``"2e9"`` or an int → bytes (None stays None)."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().replace(" ", "")
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = text[len(number):].lower()
    try:
        amount = float(number)
    except ValueError:
        amount = -1
    if unit not in units or amount < 0:
        raise MoekitError(f"{value!r} is not a size; write e.g. 4GiB, 512MB or a number of bytes.")
    return int(amount * units[unit])
