"""Checks shared by the weight loaders: file hashes, and a state dict against the shapes a
config implies, all done before a single weight is copied (as nanoGPT's `from_pretrained`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from qkv.io import sha256_file


class WeightsError(ValueError):
    """Weights, or the config that describes them, do not fit the model being built."""


def check_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise WeightsError naming the file unless its sha256 is `expected`."""
    got = sha256_file(path)
    if got != expected.lower():
        raise WeightsError(
            f"sha256 of {path} is {got}, expected {expected}: the file is not the one this loader "
            "was written for (corrupted, truncated or replaced)"
        )


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file, with an error naming the file if it is not one."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read config {path}: {e}") from e
    if not isinstance(value, dict):
        raise WeightsError(f"config {path} must hold a JSON object, got {type(value).__name__}")
    return value


def config_dict(config) -> dict:
    """A plain dict from a dict, a transformers config object or a path to a config.json."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return read_json(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise WeightsError(f"config must be a dict, a config object or a path, got {type(config)}")


@dataclass(frozen=True)
class Expected:
    """The shape a tensor must have, and the config fields that shape comes from."""

    shape: tuple[int, ...]
    fields: str  # e.g. "(vocab_size, hidden_size)"


def strip_prefix(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict:
    """Drop a wrapper prefix ("bert.", "transformer.") from keys that carry it."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def check_state(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, Expected],
    *,
    optional: Mapping[str, Expected] | None = None,
    ignored: Callable[[str], bool] = lambda key: False,
    source: str = "weights",
) -> None:
    """Compare a state dict with what the config implies; raise WeightsError listing every
    missing, unexpected and misshaped tensor by name. `optional` tensors may be absent but must
    have their shape if present; keys for which `ignored(key)` is true are skipped."""
    optional = optional or {}
    problems = []
    missing = sorted(k for k in expected if k not in state)
    if missing:
        problems.append(f"missing tensor(s) {missing}")
    unexpected = sorted(k for k in state if k not in expected and k not in optional
                        and not ignored(k))
    if unexpected:
        problems.append(f"unexpected tensor(s) {unexpected}")
    for key, value in state.items():
        want = expected.get(key) or optional.get(key)
        if want is None:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != want.shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, but the config's "
                            f"{want.fields} make it {want.shape}")
        elif not value.dtype.is_floating_point:
            problems.append(f"{key} has dtype {value.dtype}, expected a float dtype")
    if problems:
        raise WeightsError(f"{source} do not fit the config: " + "; ".join(problems))


def layer_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of layers `prefix{i}.` that the keys name (highest index + 1), 0 if none."""
    indices = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    return max(indices) + 1 if indices else 0


def checked_state(state: Mapping[str, torch.Tensor], *, prefixes: tuple[str, ...],
                  layer_prefix: str, n_layers: int, layers_field: str,
                  expected: tuple[Mapping[str, Expected], Mapping[str, Expected]],
                  ignored: Callable[[str], bool], source: str) -> dict[str, torch.Tensor]:
    """A converter's first step: drop the wrapper `prefixes`, check that the weights hold the
    config's `n_layers` layers (`layer_prefix{i}.`) and every tensor of `expected` (required,
    optional) with its shape (see check_state); return the state without the prefixes."""
    state = strip_prefix(state, prefixes)
    n = layer_count(state, layer_prefix)
    if n != n_layers:
        raise WeightsError(f"config field {layers_field}={n_layers} does not fit the weights, "
                           f"which hold {n} layers")
    required, optional = expected
    check_state(state, required, optional=optional, ignored=ignored, source=source)
    return state


def load_model(model: nn.Module, weights: Mapping[str, torch.Tensor] | str | os.PathLike,
               convert: Callable[[Mapping[str, torch.Tensor]], dict]) -> nn.Module:
    """`model` in eval mode holding `weights` (a state dict, or a .safetensors path read here),
    renamed by `convert`, which checks them all before `copy_into` copies the first one."""
    if isinstance(weights, (str, os.PathLike)):
        from safetensors.torch import load_file

        weights = load_file(os.fspath(weights))
    copy_into(model, convert(weights))
    return model.eval()


def copy_into(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Copy converted tensors into `model`; every one of the model's parameters and persistent
    buffers must be given exactly once (tied weights count once)."""
    own = model.state_dict(keep_vars=True)
    missing = sorted(k for k in own if k not in values)
    unexpected = sorted(k for k in values if k not in own)
    if missing or unexpected:  # a bug in a key map, not in the user's weights
        raise WeightsError(f"key map incomplete: model keys without a value {missing}, "
                           f"values without a model key {unexpected}")
    with torch.no_grad():
        for key, value in values.items():
            target = own[key]
            if tuple(target.shape) != tuple(value.shape):
                raise WeightsError(f"{key}: converted shape {tuple(value.shape)} does not fit "
                                   f"the model's {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
