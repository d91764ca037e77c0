"""One device resolver for every entry point: the library's `device=` arguments and the CLI's
`--device` flags."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch.device that `device` names.

    `None` and "auto" mean CUDA when it is available, else the CPU. Only CPU and CUDA devices
    are accepted: any other name (one torch does not know, or another device type such as
    "mps", "xpu" or "meta", which qkv does not support) raises ValueError with one message.
    A CUDA device on a machine without CUDA (or with fewer GPUs than the index) raises
    ValueError saying what was asked for and what this machine has.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available "
                             "on this machine; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r} was asked for, but this machine has "
                             f"{count} CUDA device(s)")
    return resolved
