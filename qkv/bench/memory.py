"""Peak memory of a piece of work on this machine, read from the kernel.

The measurements of `qkv bench`, `qkv compare` and `qkv plan`'s validation share these: each
case runs in a process of its own (`fresh_processes`, forked from a server that imported the
heavy modules once), so that the resident high-water mark it reads is its own. On Linux the mark
can be reset to the resident size now (`reset_peak`), so a peak is measured from just before the
work rather than from the imports; `return_freed_memory` makes the resident size follow the live
tensors instead of the heap's history.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import resource
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fresh_processes(preload: Sequence[str]) -> ProcessPoolExecutor:
    """An executor that runs each task in a process of its own, forked from a server process
    that has imported the modules in `preload` once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1)


def peak_resident_bytes() -> int:
    """This process's resident high-water mark in bytes: VmHWM where /proc has it, else the
    kernel's ru_maxrss (KiB on Linux)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    """This process's resident bytes now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> bool:
    """Set the high-water mark to the resident size now (Linux: clear_refs 5); False where the
    system does not let us."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def return_freed_memory(threshold: int = 64 << 10) -> bool:
    """Have glibc's malloc serve every block of `threshold` bytes or more by mmap and return it
    to the system when freed (a fixed M_MMAP_THRESHOLD, which also stops glibc raising the
    threshold after each free). The resident size then follows the live tensors; without it,
    freed blocks stay in the heap and a later peak hides in them. False where this is not
    glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
