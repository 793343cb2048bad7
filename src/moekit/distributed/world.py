"""The process group moekit works in: joined from `torchrun`'s environment, or the caller's.

`torchrun` (and Slurm scripts that set the same variables) starts one process per GPU or
per share of a CPU machine and describes the group in the environment: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``. moekit joins it with
torch's own ``env://`` rendezvous — gloo on CPUs, nccl on GPUs — so it runs wherever
PyTorch's launcher runs, with no scheduler of its own. A program that already called
``torch.distributed.init_process_group`` is simply used as it is (`current`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moekit.errors import MoekitError
from moekit.torchrun import launched  # noqa: F401 (moekit.distributed.launched)

TIMEOUT_ENV = "MOEKIT_DIST_TIMEOUT"
BACKEND_ENV = "MOEKIT_DIST_BACKEND"  # gloo or nccl, to override the choice by the machine
DEFAULT_TIMEOUT = 1800.0  # s: rank 0 writes each layer while the others wait in the next collective


@dataclass(frozen=True)
class World:
    """This process's place in the group.

    Attributes:
        rank, size: torch.distributed's.
        device: where collectives take their tensors (the CPU for gloo, this rank's GPU
            for nccl).
        timeout: seconds a collective waits for the other ranks before giving up.
    """

    rank: int
    size: int
    device: torch.device
    timeout: float

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes outputs and prints."""
        return self.rank == 0


_timeout = DEFAULT_TIMEOUT


def current() -> World | None:
    """The group when torch.distributed is initialised with more than one rank, else None
    (one process: every pass runs exactly as without torch.distributed)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), device, _timeout)


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise MoekitError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds above 0; set it to e.g. 600.")
    return value


def init(*, backend: str | None = None, timeout: float | None = None) -> World | None:
    """Join the group the launcher describes (nothing to do outside a launch, or when the
    caller already initialised torch.distributed).

    Args:
        backend: ``gloo`` or ``nccl`` (default: ``$MOEKIT_DIST_BACKEND``, else nccl when
            this machine has a CUDA GPU).
        timeout: seconds a collective waits for the other ranks (default:
            ``$MOEKIT_DIST_TIMEOUT`` or 1800). A rank that dies or hangs makes the others
            stop with an error after at most this long.
    """
    global _timeout
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched():
        return None
    if not dist.is_available():
        raise MoekitError("this torch build has no torch.distributed; run with one process or install a full torch.")
    _timeout = timeout if timeout is not None else timeout_from_env()
    backend = backend or os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise MoekitError(f"torch.distributed backend {backend!r}: moekit runs on gloo (CPUs) or nccl (GPUs).")
    if backend == "nccl":  # one GPU per rank: moekit's "cuda" then means this rank's
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count:
            raise MoekitError(f"rank with LOCAL_RANK {local} has no GPU of its own: this node has {count}. Start at "
                              f"most {count} processes per node (--nproc-per-node {count}), or set "
                              f"{BACKEND_ENV}=gloo to run on the CPUs.")
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(seconds=_timeout))
    return current()


def finish() -> None:
    """Leave the group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
