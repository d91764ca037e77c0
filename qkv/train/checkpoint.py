"""Checkpoints: a folder per step, written whole or not at all, verified on load.

Layout of RUN/checkpoints/step-00001000/:

    model.safetensors      the weights (tied weights stored once)
    model.json             {"kind": "DecoderLM", "config": TransformerConfig fields}
    tokenizer.json         the tokenizer the model was trained with
    optimizer.safetensors  optimizer moments and RNG states (absent in weights-only saves)
    trainer.json           step, data position, optimizer hyper-parameters, scaler, RNG, config
    manifest.json          size and SHA-256 of every other file; written last

Nothing is unpickled: tensors come from safetensors and everything else from JSON.
A checkpoint is assembled in a hidden temporary folder, each file fsynced, and the folder is
renamed into place, so a crash or a full disk during a save leaves the earlier checkpoints as
they were. Loading checks the manifest first, so a truncated or altered file is reported by
name, and `find_latest` falls back to the newest checkpoint that passes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qkv.data import Tokenizer
from qkv.io import atomic_write, atomic_write_text, fsync_dir, sha256_file
from qkv.nn import DecoderLM, TransformerConfig

FORMAT = 1
MODEL_FILE, MODEL_CONFIG, TOKENIZER_FILE = "model.safetensors", "model.json", "tokenizer.json"
OPTIMIZER_FILE, STATE_FILE, MANIFEST = "optimizer.safetensors", "trainer.json", "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, or for another model."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_dir(run_dir, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:08d}"


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

    Raises CheckpointError (with the OSError as its cause, e.g. a full disk) if any part
    cannot be written; the earlier checkpoints are then untouched and no partial folder stays.
    """
    final = _step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_tensors(tmp / MODEL_FILE, model_tensors(model))
        _save_json(tmp / MODEL_CONFIG, {"kind": "DecoderLM",
                                        "config": _config_dict(model.config)})
        atomic_write(tmp / TOKENIZER_FILE, lambda p: tokenizer.hf.save(str(p)))
        if optimizer is not None:
            tensors, groups = _optimizer_tensors(optimizer)
            _save_tensors(tmp / OPTIMIZER_FILE, {**tensors, **(extra_tensors or {})})
            state = {**(trainer_state or {}), "optimizer_param_groups": groups}
            _save_json(tmp / STATE_FILE, {"format": FORMAT, "step": step, **state})
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"format": FORMAT, "step": step,
                    "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
                              for f in files}}
        _save_json(tmp / MANIFEST, manifest)
        if final.exists():  # saving the same step again: replace it
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {e}; earlier checkpoints "
                              f"are untouched") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep)
    return final


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary folders left by saves that were killed (never a finished checkpoint)."""
    for p in folder.iterdir():
        if p.name.startswith(".step-") and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of a run."""
    for path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _config_dict(config: TransformerConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config)


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


# ---------------------------------------------------------------- finding and verifying


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The finished checkpoint folders of a run, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint folder `path` after checking every file's size and SHA-256.

    Raises CheckpointError naming the folder, the file and what is wrong.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}; this "
                              f"version of qkv reads format {FORMAT}")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} is {size} bytes, the manifest "
                                  f"says {info['bytes']} (truncated or overwritten)")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} fails its SHA-256 check (corrupt)")
    return manifest


def find_latest(run_dir: str | os.PathLike,
                warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint of a run that passes `verify`, or None if the run has none.

    Each newer checkpoint that fails is reported through `warn` along with the one used instead.
    Raises CheckpointError if checkpoints exist but none is usable.
    """
    problems = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems and warn is not None:
            for problem in problems:
                warn(f"{problem}; falling back to {path.name}")
        return path
    if problems:
        raise CheckpointError("no usable checkpoint in " + str(checkpoints_dir(run_dir)) + ":\n  "
                              + "\n  ".join(problems))
    return None


def resolve(path: str | os.PathLike, warn: Callable[[str], None] | None = None) -> Path:
    """A verified checkpoint folder from `path`: a checkpoint folder, or a run folder (its
    newest usable checkpoint). Raises FileNotFoundError or CheckpointError."""
    path = Path(path)
    if (path / MANIFEST).exists() or _STEP_DIR.match(path.name):
        verify(path)
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    latest = find_latest(path, warn)
    if latest is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (expected a step-* folder or a run "
                                f"folder with checkpoints/)")
    return latest


# ---------------------------------------------------------------- reading


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy checkpoint `path`'s weights into `model` after checking that every name and shape
    matches; a mismatch raises CheckpointError naming the tensor and both shapes."""
    path = Path(path)
    tensors = _load_tensors(path / MODEL_FILE)
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


def load_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore `optimizer` from checkpoint `path`; return (trainer.json, extra tensors)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} holds weights only; it cannot resume training")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    tensors = _load_tensors(path / OPTIMIZER_FILE)
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


# ---------------------------------------------------------------- random number generators


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The python, numpy, torch (and CUDA) RNG states as (JSON values, tensors)."""
    import random

    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    json_state = {"python": [py[0], list(py[1]), py[2]],
                  "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                            "cached_gaussian": float(gauss)}}
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return json_state, tensors


def set_rng_state(json_state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` returned."""
    import random

    py = json_state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = json_state["numpy"]
    np.random.set_state((n["kind"], tensors["rng.numpy"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
