"""Training MoE causal LMs from scratch or from a checkpoint, with explicit router losses."""

from moekit.train.capture import RouterCapture, RoutingRecord
from moekit.train.config import FAMILIES, ModelSpec, build_model, check_config, load_model_config
from moekit.train.evaluate import EvalResult, evaluate
from moekit.train.losses import (
    aux_free_bias_update,
    expert_load,
    load_balancing_loss,
    load_imbalance,
    router_probabilities,
    router_z_loss,
)
from moekit.train.prepare import RunData, prepare_data
from moekit.train.stream import BatchStream, learning_rate
from moekit.train.trainer import TrainConfig, train, write_log

__all__ = [
    "FAMILIES", "BatchStream", "EvalResult", "ModelSpec", "RouterCapture", "RoutingRecord", "RunData",
    "TrainConfig", "aux_free_bias_update", "build_model", "check_config", "evaluate", "expert_load",
    "learning_rate", "load_balancing_loss", "load_imbalance", "load_model_config", "prepare_data",
    "router_probabilities", "router_z_loss", "train", "write_log",
]
