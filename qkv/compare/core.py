"""What every row of `qkv compare` shares: its settings, the context it runs in, the result it
returns, tables, and the small training loop the task rows use.

A row is a function `run(ctx) -> RowResult`. It measures, draws its figures into `ctx.out` with
`ctx.save_figure`, and returns its tables, raw figures and a plain statement of what they show
beside the claim it tests and the published anchor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qkv.io import atomic_path
from qkv.train.schedule import lr_at

FULL_MAX_LEN = 16384
QUICK_MAX_LEN = 1024


@dataclass(frozen=True)
class Settings:
    """What a compare run is asked to do; a finished row is reused only under equal settings."""

    quick: bool = False
    seed: int = 0
    max_len: int | None = None  # longest n in the cost and scale rows; None: the mode's default
    memory_budget: int = 8 << 30  # bytes: the scale row's budget, and the cost row's memory cap

    @property
    def longest(self) -> int:
        """The longest sequence the cost and scale rows try."""
        if self.max_len is not None:
            return self.max_len
        return QUICK_MAX_LEN if self.quick else FULL_MAX_LEN

    def as_dict(self) -> dict:
        return {"quick": self.quick, "seed": self.seed, "max_len": self.max_len,
                "memory_budget": self.memory_budget}


def setting_text(key: str, value) -> str:
    """A setting's value as messages and the report show it: the memory budget as a size
    ("8GiB", "1,234 bytes"), anything else as it is."""
    if key == "memory_budget" and isinstance(value, int):
        from qkv.units import readable_size

        return readable_size(value)
    return str(value)


def _ignore_progress(description: str, completed: float | None = None,
                     total: float | None = None) -> None:
    pass


class Context:
    """What a row runs with: the settings, the folder its figures go to, and a progress line."""

    def __init__(self, settings: Settings, out: Path,
                 progress: Callable[..., None] = _ignore_progress):
        self.settings, self.out, self._progress = settings, Path(out), progress

    @property
    def quick(self) -> bool:
        return self.settings.quick

    def progress(self, description: str, completed: float | None = None,
                 total: float | None = None) -> None:
        """Show what the row is doing now (and how far, if completed/total are given)."""
        self._progress(description, completed, total)

    def save_figure(self, fig, name: str) -> str:
        """Write a matplotlib figure to out/name as a PNG, atomically, close it; return name."""
        import matplotlib.pyplot as plt

        if not name.endswith(".png") or "/" in name:
            raise ValueError(f"figure name must be a plain file name ending in .png, got {name!r}")
        with atomic_path(self.out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return name

    def seed(self, offset: int = 0) -> int:
        return self.settings.seed + offset

    def manual_seed(self, offset: int = 0) -> None:
        torch.manual_seed(self.seed(offset))


@dataclass
class RowResult:
    """One row's outcome, as the report shows it."""

    claim: str  # the claim the row tests, one sentence
    anchor: str  # the published figure(s) it is checked against, with the source
    findings: str  # what the numbers show, saying plainly where they disagree
    agrees: bool | None  # do the figures agree with the claim / anchor (None: no verdict)
    headline: str  # one line of the row's key numbers
    tables: list[str] = field(default_factory=list)  # markdown tables
    figures: list[str] = field(default_factory=list)  # PNG names in the run folder
    data: dict = field(default_factory=dict)  # every raw figure, JSON-serialisable

    def as_dict(self) -> dict:
        return {"claim": self.claim, "anchor": self.anchor, "findings": self.findings,
                "agrees": self.agrees, "headline": self.headline, "tables": self.tables,
                "figures": self.figures, "data": self.data}

    @classmethod
    def from_dict(cls, values: dict) -> RowResult:
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})


SEEDED = ("quick", "seed")  # what a row depends on by default
SIZED = ("quick", "max_len", "memory_budget")  # what the cost and scale rows depend on


@dataclass(frozen=True)
class Row:
    name: str
    title: str
    run: Callable[[Context], RowResult]
    minutes: float  # full-mode estimate on 2 CPU cores
    # The settings (fields of Settings) the row's result depends on: a row saved under settings
    # that differ only in others is reused as it is.
    depends_on: tuple[str, ...] = SEEDED

    def __post_init__(self):
        unknown = set(self.depends_on) - set(Settings().as_dict())
        if unknown:
            raise ValueError(f"depends_on must name fields of Settings, got {sorted(unknown)}")


def fmt(x) -> str:
    """A table cell: floats to 3 significant digits (scientific when tiny or huge)."""
    if isinstance(x, bool) or x is None:
        return "—" if x is None else ("yes" if x else "no")
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.3g}"
    return str(x)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; cells go through fmt()."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fit(model: torch.nn.Module, sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *,
        steps: int, lr: float = 3e-3, warmup: int | None = None, weight_decay: float = 0.0,
        clip: float = 1.0, progress: Callable[[int], None] | None = None) -> list[float]:
    """Train `model` for `steps` AdamW steps on `sample(step) -> (inputs, targets)`.

    The loss is the model's own (`model(inputs, targets)[1]`). The rate rises linearly over
    `warmup` steps (default: a tenth of them) and then follows a cosine down to a tenth of `lr`;
    gradients are clipped to norm `clip`. Returns the loss of every step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    warmup = max(1, steps // 10) if warmup is None else warmup
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=lr, min_lr=lr / 10, warmup_steps=warmup,
                                max_steps=steps)
        inputs, targets = sample(step)
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training diverged at step {step} (loss {losses[-1]})")
        if progress is not None:
            progress(step + 1)
    model.eval()
    return losses


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, data, *, batch_size: int = 64) -> dict:
    """Mean cross-entropy and argmax accuracy over the scored positions of a TaskData."""
    from qkv.nn import IGNORE_INDEX

    was_training = model.training
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for start in range(0, len(data.inputs), batch_size):
        inputs = data.inputs[start:start + batch_size]
        targets = data.targets[start:start + batch_size]
        logits, _ = model(inputs)
        scored = targets != IGNORE_INDEX
        picked = logits[scored].double()
        wanted = targets[scored]
        nll += torch.nn.functional.cross_entropy(picked, wanted, reduction="sum").item()
        correct += (picked.argmax(-1) == wanted).sum().item()
        count += int(scored.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("the task data has no scored positions")
    return {"loss": nll / count, "accuracy": correct / count, "scored": count}
