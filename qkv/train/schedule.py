"""The learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Steps 0..warmup_steps-1 rise linearly to `lr` (step s gets lr * (s + 1) / warmup_steps);
    from warmup_steps to max_steps - 1 the rate follows half a cosine from `lr` down to
    `min_lr`, which it reaches at the last step; past max_steps it stays at `min_lr`.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)  # 0 -> 1
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
