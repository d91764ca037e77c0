"""The training loop: AdamW with warmup + cosine, clipping, accumulation, mixed precision, DDP,
evaluation, checkpoints that resume exactly, a live progress bar and a JSONL metrics log."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.checkpoint import checkpoint as _checkpoint

from qkv.data import Tokenizer
from qkv.io import atomic_write_text
from qkv.nn import DecoderLM
from qkv.train import checkpoint as ckpt
from qkv.train import distributed
from qkv.train.config import TrainConfig
from qkv.train.data import BatchStream, TrainData, prepare_data
from qkv.train.evaluate import evaluate
from qkv.train.schedule import lr_at

METRICS_FILE = "metrics.jsonl"


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
    rank: int = 0  # this process's rank; 0 is the one that logs and saves


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available on this machine")
    return torch.device(name)


def enable_activation_checkpointing(model: DecoderLM) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them.

    Uses the model's own switch if it has one; otherwise each layer's forward is wrapped in
    torch.utils.checkpoint (non-reentrant) whenever gradients are on and no cache is in use.
    Parameter names are unchanged, so checkpoints are the same either way.
    """
    switch = getattr(model, "gradient_checkpointing_enable", None)
    if callable(switch):
        switch()
        return
    for layer in model.layers:
        forward = layer.forward

        def wrapped(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled() and kwargs.get("cache") is None:
                return _checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = wrapped


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only, as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def autocast_context(device: torch.device, precision: str):
    """torch.autocast for bf16/fp16, or a null context for fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class Trainer:
    """One training run (one process of it under DDP). Use `train(...)`."""

    def __init__(self, config: TrainConfig, dist: distributed.DistInfo, console: Console):
        self.config, self.dist, self.console = config, dist, console
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and dist.enabled:
            self.device = torch.device("cuda", dist.local_rank)  # one GPU per process
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device (it uses a GradScaler); use "
                             "'bf16' or 'fp32' on the CPU")
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.run_dir = Path(config.out_dir)
        self.metrics_path = self.run_dir / METRICS_FILE

    # ------------------------------------------------------------ output (rank 0 only)

    def say(self, message: str) -> None:
        if self.dist.is_main:
            self.console.print(message, highlight=False)

    def record(self, values: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl."""
        if self.dist.is_main:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(values) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop records of steps after `step` (they were not saved in any checkpoint)."""
        if not self.dist.is_main or not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _record_step(line) <= step]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------ setup

    def _start(self, resume: bool, overwrite: bool) -> Path | None:
        """Prepare the run folder; return the checkpoint to resume from, if any."""
        existing = ckpt.list_checkpoints(self.run_dir)
        if resume:
            found = ckpt.find_latest(self.run_dir, warn=self.say)
            if found is None:
                self.say(f"no checkpoint in {self.run_dir}; starting from scratch")
            return found
        if existing and not overwrite:
            raise FileExistsError(f"{self.run_dir} already holds checkpoints; resume the run "
                                  f"(--resume), or start over (--overwrite), or pick another "
                                  f"out_dir")
        distributed.barrier(self.dist)  # every rank has looked before rank 0 deletes
        if self.dist.is_main:
            shutil.rmtree(ckpt.checkpoints_dir(self.run_dir), ignore_errors=True)
            self.metrics_path.unlink(missing_ok=True)
        return None

    def _data(self, data: TrainData | None, resume_from: Path | None) -> TrainData:
        if data is not None:
            return data
        tokenizer = None
        if resume_from is not None:
            tokenizer = Tokenizer.load(resume_from / ckpt.TOKENIZER_FILE)
        elif self.dist.enabled:  # rank 0 trains the tokenizer; the others read it
            shared = self.run_dir / "tokenizer.json"
            if self.dist.is_main:
                prepared = prepare_data(self.config)
                prepared.tokenizer.save(shared)
            distributed.barrier(self.dist)
            if self.dist.is_main:
                return prepared
            tokenizer = Tokenizer.load(shared)
        return prepare_data(self.config, tokenizer=tokenizer)

    # ------------------------------------------------------------ the run

    def run(self, *, resume: bool = False, overwrite: bool = False,
            data: TrainData | None = None) -> TrainResult:
        c = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_from = self._start(resume, overwrite)
        data = self._data(data, resume_from)
        seed_everything(c.seed)
        model = DecoderLM(c.model_config(data.tokenizer.vocab_size)).to(self.device)
        if c.activation_checkpointing:
            enable_activation_checkpointing(model)
        optimizer = make_optimizer(model, c)
        scaler = torch.amp.GradScaler("cuda", enabled=c.precision == "fp16")
        stream = BatchStream(data.windows("train", c.seq_len), c.batch_size,
                             rank=self.dist.rank, world_size=self.dist.world_size, seed=c.seed)
        seed_everything(c.seed + self.dist.rank)
        step, tokens_seen = 0, 0
        if resume_from is not None:
            step, tokens_seen = self._restore(resume_from, model, optimizer, scaler, stream)
            self._truncate_metrics(step)
        if self.dist.is_main:
            data.tokenizer.save(self.run_dir / "tokenizer.json")
            atomic_write_text(self.run_dir / "config.json",
                              json.dumps(c.to_dict(), indent=1) + "\n")
        self.say(f"data: {data.describe()}")
        self.say(f"model: DecoderLM, {model.num_params():,} parameters, vocab "
                 f"{data.tokenizer.vocab_size}; {self.dist.world_size} process(es) on "
                 f"{self.device.type}, {c.precision}")
        ddp = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        loop = _Loop(self, model, ddp, optimizer, scaler, stream, data)
        result = loop.run(step, tokens_seen)
        result.resumed_from = step if resume_from is not None else None
        result.rank = self.dist.rank
        return result

    def _restore(self, path: Path, model, optimizer, scaler, stream) -> tuple[int, int]:
        ckpt.load_weights(model, path)
        state, extra = ckpt.load_training_state(path, optimizer)
        stream.load_state(state["data"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if self.dist.is_main:
            ckpt.set_rng_state(state["rng"], extra)
        else:  # only rank 0's generators are saved
            seed_everything(self.config.seed + self.dist.rank + 1000 * state["step"])
        if state.get("world_size", 1) != self.dist.world_size:
            self.say(f"note: the checkpoint was written by {state.get('world_size')} process(es), "
                     f"this run has {self.dist.world_size}; the data order differs from there on")
        self.say(f"resumed from {path} (step {state['step']})")
        return int(state["step"]), int(state.get("tokens_seen", 0))


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


class _Loop:
    """The step loop of one run, with its progress bar."""

    def __init__(self, trainer: Trainer, model, ddp, optimizer, scaler, stream: BatchStream,
                 data: TrainData):
        self.t, self.c = trainer, trainer.config
        self.model, self.ddp, self.optimizer, self.scaler = model, ddp, optimizer, scaler
        self.stream, self.data = stream, data
        self.autocast = autocast_context(trainer.device, self.c.precision)
        self.val_windows = data.windows("validation", self.c.seq_len)

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step of grad_accum micro-batches; (mean loss over ranks, grad norm)."""
        c, device = self.c, self.t.device
        lr = lr_at(step, lr=c.lr, min_lr=c.min_lr, warmup_steps=c.warmup_steps,
                   max_steps=c.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
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
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                              c.grad_clip if c.grad_clip is not None else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        distributed.all_reduce_sum(total, self.t.dist)
        return float(total) / self.t.dist.world_size, float(norm)

    def evaluate(self, step: int, split: str = "validation") -> dict[str, float]:
        windows = self.val_windows if split == "validation" else self.data.windows(split,
                                                                                   self.c.seq_len)
        metrics = evaluate(self.model, windows, self.data.token_bytes,
                           batch_size=self.c.batch_size, max_batches=self.c.eval_batches,
                           device=self.t.device, autocast=self.autocast, dist=self.t.dist)
        self.t.record({"kind": "eval", "split": split, "step": step, **metrics})
        self.t.say(f"step {step}: {split} loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.2f}, "
                   f"{metrics['bpb']:.3f} bits/byte")
        return metrics

    def save(self, step: int, tokens_seen: int, train_seconds: float) -> Path | None:
        if not self.t.dist.is_main:
            return None
        rng_json, rng_tensors = ckpt.rng_state()
        state = {"data": self.stream.state(), "rng": rng_json, "tokens_seen": tokens_seen,
                 "train_seconds": train_seconds, "world_size": self.t.dist.world_size,
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "config": self.c.to_dict()}
        return ckpt.save_checkpoint(self.t.run_dir, step, model=self.model,
                                    tokenizer=self.data.tokenizer, optimizer=self.optimizer,
                                    trainer_state=state, extra_tensors=rng_tensors,
                                    keep=self.c.keep_checkpoints)

    def run(self, step: int, tokens_seen: int) -> TrainResult:
        c, t = self.c, self.t
        result = TrainResult(t.run_dir, step, None)
        tokens_per_step = c.batch_size * c.grad_accum * t.dist.world_size * c.seq_len
        train_seconds, session_seconds, session_steps = 0.0, 0.0, 0
        progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=t.console, disable=not (c.progress and t.dist.is_main),
        )
        with progress:
            task = progress.add_task("train", total=c.max_steps, completed=step, loss="-",
                                     speed="-")
            while step < c.max_steps:
                start = time.perf_counter()
                loss, norm = self.train_step(step)
                step += 1
                tokens_seen += tokens_per_step
                elapsed = time.perf_counter() - start
                train_seconds += elapsed
                session_seconds += elapsed
                session_steps += 1
                speed = session_steps * tokens_per_step / session_seconds  # excludes eval, saves
                result.losses[step] = loss
                progress.update(task, completed=step, loss=f"{loss:.3f}", speed=f"{speed:,.0f}")
                if step % c.log_interval == 0 or step == c.max_steps:
                    t.record({"kind": "train", "step": step, "loss": loss, "grad_norm": norm,
                              "lr": self.optimizer.param_groups[0]["lr"],
                              "tokens": tokens_seen, "tokens_per_s": speed,
                              "train_seconds": train_seconds})
                out_of_time = c.time_limit is not None and train_seconds >= c.time_limit
                last = step == c.max_steps or out_of_time
                if last:
                    result.stopped_early = out_of_time and step < c.max_steps
                    break
                if step % c.eval_interval == 0:
                    self.evaluate(step)
                if step % c.checkpoint_interval == 0:
                    result.checkpoint = self.save(step, tokens_seen, train_seconds)
        if result.stopped_early:
            t.say(f"time limit of {c.time_limit:.0f} s reached at step {step} of {c.max_steps}")
        result.step = step
        result.eval = self.evaluate(step)
        result.checkpoint = self.save(step, tokens_seen, train_seconds) or result.checkpoint
        if result.checkpoint is not None:
            t.say(f"checkpoint: {result.checkpoint}")
        result.train_seconds = train_seconds
        if session_seconds:
            result.tokens_per_s = session_steps * tokens_per_step / session_seconds
        return result


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          data: TrainData | None = None, rank: int | None = None, world_size: int | None = None,
          init_method: str | None = None, console: Console | None = None) -> TrainResult:
    """Train a DecoderLM as `config` says and return what happened.

    resume: continue from the newest usable checkpoint in config.out_dir (falling back past
    corrupt ones, with a message), exactly: the same losses as a run that was never stopped.
    overwrite: start afresh even if out_dir holds checkpoints (otherwise FileExistsError).
    data: already prepared data (corpus, tokenizer, token streams); built from config if None.
    rank / world_size / init_method: join a DDP group by hand (else torchrun's environment).
    Raises FileNotFoundError / qkv.data.CorpusError for an unusable corpus, CheckpointError
    for a checkpoint that does not fit the model (naming the tensor).
    """
    device = resolve_device(config.device)
    dist = distributed.setup(device.type, rank=rank, world_size=world_size,
                             init_method=init_method)
    try:
        return Trainer(config, dist, console or Console()).run(resume=resume,
                                                               overwrite=overwrite, data=data)
    finally:
        distributed.teardown(dist)
