"""Checkpoints: a folder per step, written whole or not at all, verified on load.

Layout of RUN/checkpoints/step-00001000/:

    model.safetensors      the weights (tied weights stored once)
    model.json             {"kind": "DecoderLM", "config": TransformerConfig fields}
    tokenizer.json         the tokenizer the model was trained with
    optimizer.safetensors  optimizer moments and RNG states (absent in weights-only saves)
    trainer.json           step, data position, optimizer hyper-parameters, scaler, RNG, config
    manifest.json          size and SHA-256 of every other file; written last

Nothing is unpickled: tensors come from safetensors and everything else from JSON.
A checkpoint is assembled in a hidden folder `.step-N.tmp-PID`, each file fsynced, and renamed
into place, so a crash or a full disk during a save leaves the earlier checkpoints as they were.
A complete step-N is never rewritten; an unusable one is moved aside only after its replacement
is complete, and `recover` puts back a complete copy that a crash left under a hidden name.
Loading checks the manifest first, so a truncated or altered file is reported by name, and
`find_latest` falls back to the newest checkpoint that passes. Finding, checking and recovering
checkpoint folders is qkv.train.layout's part; its names are importable from here too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qkv.data import Tokenizer
from qkv.io import atomic_write, atomic_write_text, sha256_file
from qkv.nn import DecoderLM, TransformerConfig
from qkv.train.layout import (
    FORMAT,
    MANIFEST,
    MODEL_CONFIG,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RUN_CONFIG,
    STATE_FILE,
    STEP_DIR,
    TOKENIZER_FILE,
    CheckpointError,
    checkpoints_dir,
    find_latest,
    fresh_name,
    install,
    list_checkpoints,
    prune,
    recover,
    resolve,
    step_dir,
    usable,
    verify,
)

__all__ = [
    "FORMAT", "MANIFEST", "MODEL_CONFIG", "MODEL_FILE", "OPTIMIZER_FILE", "STATE_FILE",
    "TOKENIZER_FILE", "CheckpointError", "checkpoints_dir", "describe_checkpoints",
    "find_latest", "list_checkpoints", "load_model", "load_tensors", "load_weights",
    "model_tensors", "prune", "read_model_config", "read_run_config", "recover", "resolve",
    "save_checkpoint", "verify",
]

# ---------------------------------------------------------------- writing


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each shared tensor (tied weights) under its first name only."""
    seen: set[tuple[int, tuple, tuple]] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            tensors[name] = t
    return tensors


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp)))


def _save_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: DecoderLM,
                    tokenizer: Tokenizer, optimizer: torch.optim.Optimizer | None = None,
                    trainer_state: dict[str, Any] | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None, keep: int = 3) -> Path:
    """Write checkpoint `step` of a run and keep only the newest `keep`; return its folder.

    A complete checkpoint of that step is never rewritten: it is returned as it is. One that
    fails its checks is replaced, and only after the new one has its name. Raises
    CheckpointError (with the OSError or SafetensorError as its cause, e.g. a full disk) if any
    part cannot be written, saying whether earlier checkpoints exist (they are untouched) and
    how to resume; no partial folder stays.
    """
    final = step_dir(run_dir, step)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover(run_dir)
        if usable(final):
            return final
        tmp = fresh_name(final, "tmp")
        tmp.mkdir()
        _write_files(tmp, step, model, tokenizer, optimizer, trainer_state, extra_tensors)
        install(tmp, final)
    except (OSError, SafetensorError) as e:
        _discard(tmp)
        raise CheckpointError(_write_failure(run_dir, final, e)) from e
    except BaseException:
        _discard(tmp)
        raise
    prune(run_dir, keep)
    return final


def _write_failure(run_dir: str | os.PathLike, final: Path, error: Exception) -> str:
    """Why checkpoint `final` could not be written, what is left, and what to do."""
    try:
        earlier = [p for p in list_checkpoints(run_dir) if p != final]
    except OSError:
        earlier = []
    kept = (f"the earlier checkpoints are untouched (newest: {earlier[-1].name}); " if earlier
            else "no earlier checkpoint exists; ")
    return (f"could not write checkpoint {final}: {error}; {kept}free space (or fix the "
            f"folder's permissions), then qkv train --out-dir {run_dir} --resume")


def _discard(tmp: Path | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_files(folder: Path, step: int, model, tokenizer, optimizer, trainer_state,
                 extra_tensors) -> None:
    """Every file of a checkpoint into `folder`, the manifest last."""
    _save_tensors(folder / MODEL_FILE, model_tensors(model))
    _save_json(folder / MODEL_CONFIG, {"kind": "DecoderLM",
                                       "config": dataclasses.asdict(model.config)})
    tokenizer.save(folder / TOKENIZER_FILE)
    if optimizer is not None:
        tensors, groups = _optimizer_tensors(optimizer)
        _save_tensors(folder / OPTIMIZER_FILE, {**tensors, **(extra_tensors or {})})
        state = {**(trainer_state or {}), "optimizer_param_groups": groups}
        _save_json(folder / STATE_FILE, {"format": FORMAT, "step": step, **state})
    files = sorted(p.name for p in folder.iterdir())
    manifest = {"format": FORMAT, "step": step,
                "files": {f: {"bytes": (folder / f).stat().st_size,
                              "sha256": sha256_file(folder / f)} for f in files}}
    _save_json(folder / MANIFEST, manifest)


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state as flat tensors "optimizer.<param>.<name>" plus JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optimizer.{pid}.{name}"] = value
    return tensors, sd["param_groups"]


# ---------------------------------------------------------------- reading


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError naming it if it cannot be read."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy checkpoint `path`'s weights into `model` after checking that every name and shape
    matches; a mismatch raises CheckpointError naming the tensor and both shapes."""
    path = Path(path)
    tensors = load_tensors(path / MODEL_FILE)
    expected = model_tensors(model)
    for name, target in expected.items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint {path} does not fit this model: it has no tensor "
                                  f"{name!r} (a different model shape or kind)")
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: tensor {name!r} has shape "
                f"{tuple(tensors[name].shape)} in the checkpoint but {tuple(target.shape)} in "
                f"the model (a different model shape)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this model: it has tensor(s) "
                              f"{unexpected[:5]} that the model lacks (a different model shape)")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def read_model_config(path: str | os.PathLike) -> TransformerConfig:
    """The TransformerConfig a checkpoint's model was built with."""
    path = Path(path)
    try:
        info = json.loads((path / MODEL_CONFIG).read_text(encoding="utf-8"))
        return TransformerConfig.from_dict(info["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {MODEL_CONFIG} ({e})") from None


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               warn: Callable[[str], None] | None = None
               ) -> tuple[DecoderLM, Tokenizer, Path]:
    """(model in eval mode, tokenizer, checkpoint folder) from a checkpoint or run folder."""
    folder = resolve(path, warn)
    model = DecoderLM(read_model_config(folder))
    load_weights(model, folder)
    tokenizer = Tokenizer.load(folder / TOKENIZER_FILE)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"checkpoint {folder}: tokenizer has {tokenizer.vocab_size} ids "
                              f"but the model only {model.config.vocab_size}")
    return model.to(device).eval(), tokenizer, folder


# ---------------------------------------------------------------- describing runs


def read_trainer_state(path: str | os.PathLike, *, strict: bool = True) -> dict[str, Any]:
    """A checkpoint's trainer.json. A weights-only checkpoint, or one whose file cannot be read
    or is not a JSON object, raises CheckpointError (it cannot resume training), or gives {}
    when not `strict`."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if isinstance(state, dict):
            return state
        problem = (f"checkpoint {path}: {STATE_FILE} holds a JSON {type(state).__name__}, "
                   f"not an object")
    except FileNotFoundError:
        problem = f"checkpoint {path} holds weights only; it cannot resume training"
    except (OSError, ValueError) as e:
        problem = f"checkpoint {path}: cannot read {STATE_FILE} ({e})"
    if strict:
        raise CheckpointError(problem)
    return {}


def read_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """The TrainConfig (as a dict) a run was trained with.

    `path` is a checkpoint folder (its trainer.json; {} for a weights-only checkpoint) or a run
    folder (its newest usable checkpoint's, else the run's config.json). Raises
    FileNotFoundError if a run folder has neither, CheckpointError if checkpoints exist but
    none is usable.
    """
    path = Path(path)
    if not ((path / MANIFEST).exists() or STEP_DIR.match(path.name)):
        latest = find_latest(path)
        if latest is None:
            config = path / RUN_CONFIG
            if not config.is_file():
                raise FileNotFoundError(f"{path} holds no checkpoint and no config.json")
            return json.loads(config.read_text(encoding="utf-8"))
        path = latest
    return dict(read_trainer_state(path, strict=False).get("config") or {})


def describe_checkpoints(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per checkpoint folder of a run, oldest first.

    Keys: step, path, usable (passes `verify`), problem (why not, else None), latest (True for
    the one `--resume` and `qkv eval RUN` use: the newest usable), tokens_seen, train_seconds,
    and eval: the validation metrics of that step (loss, ppl, bpb, ...), from the checkpoint or
    else from the run's metrics.jsonl, or None if that step was not evaluated.
    """
    from qkv.train.metrics import METRICS_FILE, read_records

    logged = {r.get("step"): r for r in read_records(Path(run_dir) / METRICS_FILE)
              if r.get("kind") == "eval" and r.get("split", "validation") == "validation"}
    rows = []
    for path in list_checkpoints(run_dir):
        problem = None
        try:
            verify(path)
        except CheckpointError as e:
            problem = str(e)
        step = int(STEP_DIR.match(path.name).group(1))
        state = read_trainer_state(path, strict=False)
        metrics = state.get("eval")
        if not isinstance(metrics, dict) or not metrics:
            metrics = logged.get(step)
        if isinstance(metrics, dict):
            metrics = {k: v for k, v in metrics.items() if k not in ("kind", "split", "step")}
        else:
            metrics = None
        rows.append({"step": step, "path": str(path), "usable": problem is None,
                     "problem": problem, "latest": False, "eval": metrics,
                     "tokens_seen": state.get("tokens_seen"),
                     "train_seconds": state.get("train_seconds")})
    usable = [row for row in rows if row["usable"]]
    if usable:
        usable[-1]["latest"] = True
    return rows
