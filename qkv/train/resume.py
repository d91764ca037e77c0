"""What resuming a run needs beyond the checkpoint files: the saved trainer state, the check
that the settings still describe the same run, and each rank's random number generators."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from qkv.train import distributed
from qkv.train.checkpoint import (
    OPTIMIZER_FILE,
    CheckpointError,
    load_tensors,
    read_trainer_state,
)
from qkv.train.config import TrainConfig
from qkv.train.rng import rank_prefix, rng_state, seed_everything, set_rng_state

# Settings that define a run: changing one on resume would train a different model on different
# data than the checkpoint, so it is refused. Every other setting may change and is logged.
RUN_DEFINING = ("corpus", "suffixes", "text_key", "split", "split_fractions", "max_bytes",
                "max_files", "tokenizer", "vocab_size", "seq_len", "model", "seed", "batch_size",
                "grad_accum", "max_tokens")
_NOT_LOGGED = ("out_dir", "progress")


def _model_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The model's resolved TransformerConfig fields, so that spelling out a default is no
    change; the raw table if the values do not form a config."""
    try:
        config = TrainConfig.from_dict(values)
        return dataclasses.asdict(config.model_config(config.vocab_size))
    except (ValueError, TypeError):
        return dict(values.get("model") or {})


def setting_changes(saved: dict[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{setting: (saved value, new value)} for every setting that differs; model fields are
    named "model.<field>"."""
    new = config.to_dict()
    changes = {}
    for key, value in new.items():
        if key == "model" or key in _NOT_LOGGED or key not in saved:
            continue
        if saved[key] != value:
            changes[key] = (saved[key], value)
    old_model, new_model = _model_fields(saved), _model_fields(new)
    for key in sorted(set(old_model) | set(new_model)):
        if old_model.get(key) != new_model.get(key):
            changes[f"model.{key}"] = (old_model.get(key), new_model.get(key))
    return changes


def run_defining(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The entries of `changes` (from setting_changes) that change what defines the run."""
    return {k: v for k, v in changes.items() if k.split(".")[0] in RUN_DEFINING}


def check_settings(saved: dict[str, Any] | None, config: TrainConfig, checkpoint: Path
                   ) -> dict[str, tuple[Any, Any]]:
    """The allowed setting changes of a resume; ValueError listing the refused ones (settings
    that define the run) with their saved and new values."""
    if not saved:
        return {}  # a checkpoint from before settings were saved with it
    changes = setting_changes(saved, config)
    refused = run_defining(changes)
    if refused:
        listed = "; ".join(f"{k}: {old!r} in the run, {new!r} now"
                           for k, (old, new) in refused.items())
        raise ValueError(f"--resume cannot change the settings that define the run in "
                         f"{checkpoint.parent.parent} ({listed}); resume with the run's own "
                         f"settings, or start a new run in another out_dir")
    return changes


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any] | None = None
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore `optimizer` from checkpoint `path`; return (trainer.json, extra tensors).
    `state` is the checkpoint's trainer.json if the caller has read it already."""
    path = Path(path)
    state = dict(read_trainer_state(path) if state is None else state)
    tensors = load_tensors(path / OPTIMIZER_FILE)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    extra = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
        else:
            extra[key] = value
    groups = state.pop("optimizer_param_groups")
    opt_state = dict(sorted(opt_state.items()))
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({e})") from None
    return state, extra


def gather_rng_states(dist: distributed.DistInfo
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every rank's generators, collected on every rank (a collective call) as trainer.json
    values {"rng": rank 0's, "rng_ranks": [rank 1's, ...]} and tensors for the checkpoint."""
    states = distributed.all_gather_object(rng_state(rank_prefix(dist.rank)), dist)
    tensors = {name: t for _, ts in states for name, t in ts.items()}
    return {"rng": states[0][0], "rng_ranks": [s for s, _ in states[1:]]}, tensors


def restore_rng(state: dict[str, Any], tensors: dict[str, torch.Tensor],
                dist: distributed.DistInfo, seed: int) -> bool:
    """Put this rank's generators back as the checkpoint saved them; return False (and reseed
    from the seed, the rank and the step) if the checkpoint has none for this rank."""
    prefix = rank_prefix(dist.rank)
    ranks = state.get("rng_ranks") or []
    same_world = state.get("world_size", 1) == dist.world_size
    if dist.rank == 0 or (same_world and dist.rank <= len(ranks)
                          and f"{prefix}.torch" in tensors):
        saved = state["rng"] if dist.rank == 0 else ranks[dist.rank - 1]
        set_rng_state(saved, tensors, prefix)
        return True
    seed_everything(seed + dist.rank + 1000 * int(state["step"]))
    return False
