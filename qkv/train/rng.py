"""The random number generators of a training process (python, numpy, torch, CUDA), saved and
restored so that a resumed run draws what an uninterrupted one would: on every rank."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(prefix: str = "rng") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """This process's python, numpy, torch (and CUDA) RNG states as (JSON values, tensors
    named `<prefix>.torch`, `<prefix>.numpy`, `<prefix>.cuda.<i>`)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    json_state = {"python": [py[0], list(py[1]), py[2]],
                  "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                            "cached_gaussian": float(gauss)}}
    tensors = {f"{prefix}.torch": torch.get_rng_state(),
               f"{prefix}.numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}.cuda.{i}"] = s
    return json_state, tensors


def set_rng_state(json_state: dict[str, Any], tensors: dict[str, torch.Tensor],
                  prefix: str = "rng") -> None:
    """Restore what `rng_state(prefix)` returned."""
    py = json_state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = json_state["numpy"]
    np.random.set_state((n["kind"], tensors[f"{prefix}.numpy"].numpy().astype(np.uint32),
                         n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(tensors[f"{prefix}.torch"])
    names = [k for k in tensors if k.startswith(f"{prefix}.cuda.")]
    cuda = [tensors[k] for k in sorted(names, key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def rank_prefix(rank: int) -> str:
    """Where rank `rank`'s generators live in a checkpoint: "rng" for rank 0 (the format of
    single-process runs), "rng.rank<k>" for the others."""
    return "rng" if rank == 0 else f"rng.rank{rank}"
