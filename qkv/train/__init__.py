"""qkv.train: the training loop, its configuration, checkpoints and distributed training."""

from qkv.train.checkpoint import (
    CheckpointError,
    describe_checkpoints,
    find_latest,
    list_checkpoints,
    load_model,
    load_weights,
    read_run_config,
    save_checkpoint,
    verify,
)
from qkv.train.config import DEFAULT_MODEL, TrainConfig, parse_assignments
from qkv.train.data import BatchStream, TrainData, prepare_data, token_byte_lengths
from qkv.train.evaluate import evaluate
from qkv.train.loop import TrainResult, train
from qkv.train.runfolder import RunInUseError
from qkv.train.schedule import lr_at

__all__ = [
    "CheckpointError", "describe_checkpoints", "find_latest", "list_checkpoints", "load_model",
    "load_weights", "read_run_config", "save_checkpoint", "verify",
    "DEFAULT_MODEL", "TrainConfig", "parse_assignments",
    "BatchStream", "TrainData", "prepare_data", "token_byte_lengths",
    "evaluate",
    "TrainResult", "train",
    "RunInUseError",
    "lr_at",
]
