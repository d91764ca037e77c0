"""The step loop of a training run: optimizer steps, metrics, evaluations, checkpoints, the
progress bar, and Ctrl-C, which ends the run at a step boundary with a checkpoint."""

from __future__ import annotations

import math
import shlex
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from qkv.nn import IGNORE_INDEX
from qkv.train import checkpoint as ckpt
from qkv.train import distributed
from qkv.train.data import BatchStream, TrainData
from qkv.train.evaluate import evaluate
from qkv.train.resume import gather_rng_states
from qkv.train.schedule import lr_at


@dataclass
class TrainResult:
    """What a run did: its folder, last step, last checkpoint, every step's loss, last eval."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> mean train loss
    eval: dict[str, float] | None = None
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    stopped_early: bool = False
    resumed_from: int | None = None
    already_complete: bool = False  # resumed at max_steps: nothing was trained or written
    rank: int = 0  # this process's rank; 0 is the one that logs and saves


def interrupted_message(where: str, run_dir: Path, checkpoint: Path | None) -> str:
    """What a Ctrl-C message says after `where`: the run's last checkpoint (or that there is
    none yet) and the command that continues it."""
    how = f"qkv train --out-dir {shlex.quote(str(run_dir))} --resume"
    if checkpoint is not None:
        return f"{where}; the last checkpoint is {checkpoint}; continue with: {how}"
    return f"{where}; no checkpoint exists yet, so {how} starts the run from scratch"


class StepBoundaryInterrupt:
    """While active, the first Ctrl-C only sets `requested`, so the step in progress ends
    cleanly; a second one interrupts at once. Inactive off the main thread and when `enabled`
    is False (under DDP, where ranks could stop at different steps)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StepBoundaryInterrupt:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            previous = self._previous  # None when it was not set from Python
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None
                          else previous)


class StepLoop:
    """The step loop of one run (one process of it under DDP), with its progress bar."""

    def __init__(self, trainer, model, ddp, optimizer, scaler, stream: BatchStream,
                 data: TrainData, autocast, resumed_from: Path | None):
        self.t, self.c = trainer, trainer.config
        self.model, self.ddp, self.optimizer, self.scaler = model, ddp, optimizer, scaler
        self.stream, self.data, self.autocast = stream, data, autocast
        self.val_windows = data.windows("validation", self.c.seq_len)
        self.last_checkpoint = resumed_from
        self.last_eval: tuple[int, dict[str, float]] | None = None

    def train_step(self, step: int) -> tuple[float, float, int]:
        """One optimizer step of grad_accum micro-batches; (mean loss over ranks, grad norm,
        tokens scored on all ranks: targets other than IGNORE_INDEX, so padding is not
        counted)."""
        c, device = self.c, self.t.device
        lr = lr_at(step, lr=c.lr, min_lr=c.min_lr, warmup_steps=c.warmup_steps,
                   max_steps=c.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
        tokens = torch.zeros((), device=device, dtype=torch.float64)
        for micro in range(c.grad_accum):
            x, y = self.stream.next()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = micro == c.grad_accum - 1
            sync = nullcontext() if last or not self.t.dist.enabled else self.ddp.no_sync()
            with sync:
                with self.autocast:
                    _, loss = self.ddp(x, y)
                self.scaler.scale(loss / c.grad_accum).backward()
            total += loss.detach() / c.grad_accum
            tokens += (y != IGNORE_INDEX).sum()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                              c.grad_clip if c.grad_clip is not None else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.stack([total.double(), tokens])
        distributed.all_reduce_sum(sums, self.t.dist)
        # Every process of a context-parallel group holds its group's loss and whole batch.
        return (float(sums[0]) / self.t.dist.world_size, float(norm),
                int(sums[1]) // c.context_parallel)

    def evaluate(self, step: int) -> dict[str, float]:
        # Under context parallelism each process scores its shard of its group's windows.
        model = self.ddp.module if self.c.context_parallel > 1 else self.model
        metrics = evaluate(model, self.val_windows, self.data.token_bytes,
                           batch_size=self.c.batch_size, max_batches=self.c.eval_batches,
                           device=self.t.device, autocast=self.autocast, dist=self.t.dist,
                           replica=(self.t.dp_rank, self.t.dp_size))
        self.t.record({"kind": "eval", "split": "validation", "step": step, **metrics})
        self.t.say(f"step {step}: validation loss {metrics['loss']:.4f}, ppl "
                   f"{metrics['ppl']:.2f}, {metrics['bpb']:.3f} bits/byte")
        self.last_eval = (step, metrics)
        return metrics

    def save(self, step: int, tokens_seen: int, train_seconds: float) -> Path | None:
        """Checkpoint `step` (a collective call: every rank's generators are gathered)."""
        rng_values, rng_tensors = gather_rng_states(self.t.dist)
        if not self.t.dist.is_main:
            return None
        evaluated = self.last_eval[1] if self.last_eval and self.last_eval[0] == step else None
        state = {"data": self.stream.state(), **rng_values, "tokens_seen": tokens_seen,
                 "train_seconds": train_seconds, "world_size": self.t.dist.world_size,
                 "context_parallel": self.c.context_parallel,
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "config": self.c.to_dict(), "eval": evaluated}
        self.last_checkpoint = ckpt.save_checkpoint(
            self.t.run_dir, step, model=self.model, tokenizer=self.data.tokenizer,
            optimizer=self.optimizer, trainer_state=state, extra_tensors=rng_tensors,
            keep=self.c.keep_checkpoints)
        return self.last_checkpoint

    def interrupted(self, step: int, tokens_seen: int, train_seconds: float,
                    at_boundary: bool) -> str:
        """Save at `step` if the state is whole (single process, between steps) and say where
        the run can continue from."""
        where = f"interrupted at step {step}"
        if at_boundary and not self.t.dist.enabled:
            try:
                path = self.save(step, tokens_seen, train_seconds)
                return (f"{where}; checkpoint saved to {path}; continue with: qkv train "
                        f"--out-dir {self.t.run_dir} --resume")
            except ckpt.CheckpointError as e:
                where = f"{where}; {e}"
            except KeyboardInterrupt:  # a second Ctrl-C during the save
                where = f"{where} while saving step {step}"
        return interrupted_message(where, self.t.run_dir, self.last_checkpoint)

    def run(self, step: int, tokens_seen: int, train_seconds: float = 0.0) -> TrainResult:
        """Train from `step` (with `tokens_seen` tokens and `train_seconds` s of training
        behind it, carried over on resume) to max_steps, the time limit, or Ctrl-C."""
        c, t = self.c, self.t
        result = TrainResult(t.run_dir, step, self.last_checkpoint)
        session_seconds, session_tokens = 0.0, 0
        progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=t.console, disable=not (c.progress and t.dist.is_main),
        )
        interrupt = StepBoundaryInterrupt(enabled=not t.dist.enabled)
        stop = False
        try:
            with progress, interrupt:
                task = progress.add_task("train", total=c.max_steps, completed=step, loss="-",
                                         speed="-")
                while step < c.max_steps:
                    start = time.perf_counter()
                    loss, norm, tokens = self.train_step(step)
                    step += 1
                    tokens_seen += tokens
                    session_tokens += tokens
                    elapsed = time.perf_counter() - start
                    train_seconds += elapsed
                    session_seconds += elapsed
                    speed = session_tokens / session_seconds  # no eval, saves
                    result.losses[step] = loss
                    progress.update(task, completed=step, loss=f"{loss:.3f}",
                                    speed=f"{speed:,.0f}")
                    if step % c.log_interval == 0 or step == c.max_steps:
                        t.record({"kind": "train", "step": step, "loss": loss, "grad_norm": norm,
                                  "lr": self.optimizer.param_groups[0]["lr"],
                                  "tokens": tokens_seen, "tokens_per_s": speed,
                                  "train_seconds": train_seconds})
                    out_of_time = c.time_limit is not None and train_seconds >= c.time_limit
                    if step == c.max_steps or out_of_time:
                        result.stopped_early = out_of_time and step < c.max_steps
                        break
                    if step % c.eval_interval == 0:
                        self.evaluate(step)
                    if step % c.checkpoint_interval == 0:
                        result.checkpoint = self.save(step, tokens_seen, train_seconds)
                    if interrupt.requested:
                        stop = True
                        break
        except KeyboardInterrupt:
            message = self.interrupted(step, tokens_seen, train_seconds, at_boundary=False)
            raise KeyboardInterrupt(message) from None
        if stop:
            raise KeyboardInterrupt(self.interrupted(step, tokens_seen, train_seconds,
                                                     at_boundary=True))
        if result.stopped_early:
            t.say(f"time limit of {c.time_limit:.0f} s reached at step {step} of {c.max_steps}")
        result.step = step
        try:  # the final state is saved before the final evaluation, which Ctrl-C may cut
            result.checkpoint = self.save(step, tokens_seen, train_seconds) or result.checkpoint
            if result.checkpoint is not None:
                t.say(f"checkpoint: {result.checkpoint}")
            result.eval = self.evaluate(step)
        except KeyboardInterrupt:
            where = f"interrupted after step {step}, in the final save or evaluation"
            raise KeyboardInterrupt(interrupted_message(where, t.run_dir,
                                                        self.last_checkpoint)) from None
        result.train_seconds = train_seconds
        if session_seconds:
            result.tokens_per_s = session_tokens / session_seconds
        return result
