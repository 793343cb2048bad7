"""Calibration, compression and evaluation across processes, GPUs and nodes.

Launched by ``torchrun`` (``torchrun --nproc-per-node N -m moekit compress ...``), each
rank streams the same decoder layers but pushes only its share of the calibration or
evaluation rows (`shard`); each layer's statistics are combined with collectives before
the layer's steps run (`collectives`, used by `moekit.calib`), so every rank computes the same edit; rank 0 alone
writes and prints. Inputs are compared across ranks before any work (`agree`).
"""

from moekit.distributed.agree import agree_inputs, agree_layer
from moekit.distributed.collectives import all_sum, gather_rows, reduce_sums, traffic
from moekit.distributed.shard import my_batches
from moekit.distributed.world import World, current, finish, init, launched

__all__ = ["World", "agree_inputs", "agree_layer", "all_sum", "current", "finish", "gather_rows", "init",
           "launched", "my_batches", "reduce_sums", "traffic"]
