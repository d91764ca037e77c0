"""The training loop: AdamW with warmup + cosine, clipping, accumulation, mixed precision, DDP,
evaluation, checkpoints that resume exactly, a live progress bar and a JSONL metrics log.

A run holds its folder's lock from start to end (qkv.train.runfolder), records metrics through
qkv.train.metrics, and resumes through qkv.train.resume; the step loop itself is in
qkv.train.steps.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console

from qkv.data import Tokenizer
from qkv.device import resolve_device
from qkv.io import atomic_write_text
from qkv.nn import DecoderLM
from qkv.train import checkpoint as ckpt
from qkv.train import distributed, resume, runfolder
from qkv.train.config import TrainConfig, check_fits
from qkv.train.data import BatchStream, TrainData, prepare_data
from qkv.train.metrics import MetricsLog
from qkv.train.rng import seed_everything
from qkv.train.steps import StepLoop, TrainResult, interrupted_message

__all__ = ["TrainResult", "Trainer", "autocast_context", "make_optimizer", "train"]


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
        cp = config.context_parallel
        if cp > 1 and dist.world_size % cp:
            raise ValueError(f"context_parallel={cp} needs a number of processes that it "
                             f"divides, got {dist.world_size}; launch a multiple of {cp} "
                             f"under torchrun --nproc_per_node")
        # Data parallel replicas: the processes of one context-parallel group read one batch.
        self.dp_rank, self.dp_size = dist.rank // cp, dist.world_size // cp
        self.run_dir = Path(config.out_dir)
        self.metrics = MetricsLog(self.run_dir, enabled=dist.is_main)
        self._replace_old_run = False

    def say(self, message: str) -> None:
        """Tell the user (rank 0 only) through the console."""
        if self.dist.is_main:
            self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        """A warning (rank 0 only) through `warnings`, never printed to stdout."""
        if self.dist.is_main:
            warnings.warn(message, UserWarning, stacklevel=2)

    def record(self, values: dict) -> None:
        """Append one record to metrics.jsonl (rank 0 only)."""
        self.metrics.append(values)

    # ------------------------------------------------------------ setup

    def _start(self, resume_run: bool, overwrite: bool) -> Path | None:
        """Prepare the run folder (under its lock); return the checkpoint to resume from."""
        if self.dist.is_main:
            for note in ckpt.recover(self.run_dir):
                self.warn(note)
        distributed.barrier(self.dist)  # every rank looks after the recovery
        existing = ckpt.list_checkpoints(self.run_dir)
        if resume_run:
            try:
                found = ckpt.find_latest(self.run_dir, warn=self.warn)
            except ckpt.CheckpointError as e:
                first, _, rest = str(e).partition(":\n")
                raise ckpt.CheckpointError(f"{first}; start over with --overwrite instead of "
                                           f"--resume, or pick another out_dir:\n{rest}") from None
            if found is None:
                self.say(f"no checkpoint in {self.run_dir}; starting from scratch")
                self.metrics.reset()
            return found
        if existing and not overwrite:
            raise FileExistsError(f"{self.run_dir} already holds checkpoints; resume the run "
                                  f"(--resume), or start over (--overwrite), or pick another "
                                  f"out_dir")
        self._replace_old_run = True  # removed once the new run's data and model are built
        return None

    def _remove_old_run(self) -> None:
        """Delete the run this one replaces (--overwrite or a fresh start), only now that the
        new run's data, tokenizer and model exist: a failure or Ctrl-C before leaves it intact."""
        if not self._replace_old_run:
            return
        distributed.barrier(self.dist)  # every rank has looked before rank 0 deletes
        if self.dist.is_main:
            shutil.rmtree(ckpt.checkpoints_dir(self.run_dir), ignore_errors=True)
            self.metrics.reset()
        self._replace_old_run = False

    def _data(self, data: TrainData | None, resume_from: Path | None) -> TrainData:
        if data is not None:
            return data
        tokenizer = None
        if resume_from is not None:
            tokenizer = Tokenizer.load(resume_from / ckpt.TOKENIZER_FILE)
        elif self.dist.enabled:  # rank 0 trains the tokenizer; the others read it
            shared = self.run_dir / ckpt.TOKENIZER_FILE
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
        if resume and overwrite:
            raise ValueError("--resume and --overwrite cannot be used together: resume the run "
                             "in its folder (--resume), or start it over (--overwrite)")
        check_fits(self.config, self.device)  # before the run folder or any data is touched
        try:
            with runfolder.claim(self.run_dir, self.dist):
                return self._run(resume, overwrite, data)
        except KeyboardInterrupt as e:
            if e.args:  # the step loop's message already says where the run stands
                raise
            latest = ckpt.list_checkpoints(self.run_dir)
            if self._replace_old_run and latest:
                raise KeyboardInterrupt(f"interrupted before the new run began; the run in "
                                        f"{self.run_dir} is unchanged") from None
            raise KeyboardInterrupt(interrupted_message(
                "interrupted", self.run_dir, latest[-1] if latest else None)) from None

    def _run(self, resume_run: bool, overwrite: bool, data: TrainData | None) -> TrainResult:
        c = self.config
        resume_from = self._start(resume_run, overwrite)
        changes, saved = {}, None
        if resume_from is not None:
            saved = ckpt.read_trainer_state(resume_from)
            changes = resume.check_settings(saved.get("config"), c, resume_from)
            if int(saved["step"]) >= c.max_steps:
                return self._complete(resume_from, int(saved["step"]))
        data = self._data(data, resume_from)
        seed_everything(c.seed)
        model = DecoderLM(c.model_config(data.tokenizer.vocab_size)).to(self.device)
        if c.activation_checkpointing:
            model.set_activation_checkpointing(True)
        optimizer = make_optimizer(model, c)
        scaler = torch.amp.GradScaler("cuda", enabled=c.precision == "fp16")
        self._remove_old_run()
        stream = BatchStream(data.windows("train", c.seq_len), c.batch_size,
                             rank=self.dp_rank, world_size=self.dp_size, seed=c.seed)
        seed_everything(c.seed + self.dist.rank)
        step, tokens_seen, train_seconds = 0, 0, 0.0
        if resume_from is not None:
            step, tokens_seen, train_seconds = self._restore(resume_from, saved, model,
                                                             optimizer, scaler, stream)
            self._log_resume(step, changes)
        if self.dist.is_main:
            data.tokenizer.save(self.run_dir / ckpt.TOKENIZER_FILE)
            atomic_write_text(self.run_dir / ckpt.RUN_CONFIG,
                              json.dumps(c.to_dict(), indent=1) + "\n")
        self.say(f"data: {data.describe()}")
        parallel = (f" ({self.dp_size} data parallel × {c.context_parallel} context parallel)"
                    if c.context_parallel > 1 else "")
        self.say(f"model: DecoderLM, {model.num_params():,} parameters, vocab "
                 f"{data.tokenizer.vocab_size}; {self.dist.world_size} process(es){parallel} "
                 f"on {self.device.type}, {c.precision}")
        ddp = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel(self._sharded(model), device_ids=ids)
        loop = StepLoop(self, model, ddp, optimizer, scaler, stream, data,
                        autocast_context(self.device, c.precision), resume_from)
        result = loop.run(step, tokens_seen, train_seconds)
        result.resumed_from = step if resume_from is not None else None
        result.rank = self.dist.rank
        return result

    def _sharded(self, model: DecoderLM) -> torch.nn.Module:
        """The model as each process runs it: whole, or on its shard of every sequence."""
        if self.config.context_parallel == 1:
            return model
        from qkv.distributed.lm import ContextParallelLM, make_groups

        group = make_groups(self.config.context_parallel, self.dist.world_size)
        return ContextParallelLM(model, group)

    def _complete(self, checkpoint: Path, step: int) -> TrainResult:
        """A resumed run that has already reached max_steps: nothing to train or write."""
        self.say(f"the run in {self.run_dir} is complete: {checkpoint} is step {step} of "
                 f"max_steps {self.config.max_steps}; nothing to do (raise max_steps to train "
                 f"further)")
        return TrainResult(self.run_dir, step, checkpoint, resumed_from=step,
                           already_complete=True, rank=self.dist.rank)

    def _log_resume(self, step: int, changes: dict) -> None:
        """Cut the metrics log back to `step` and note the settings that changed."""
        dropped = self.metrics.rewind(step)
        if dropped:
            self.say(f"metrics.jsonl: dropped {dropped} record(s) after step {step} or torn")
        if changes:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            self.say(f"resuming with changed settings: {listed}")
            self.record({"kind": "resume", "step": step,
                         "changed": {k: [old, new] for k, (old, new) in changes.items()}})

    def _restore(self, path: Path, saved: dict, model, optimizer, scaler, stream
                 ) -> tuple[int, int, float]:
        """Load checkpoint `path`, whose trainer.json is `saved`; (step, tokens_seen,
        train_seconds) it had reached."""
        ckpt.load_weights(model, path)
        state, extra = resume.load_training_state(path, optimizer, saved)
        stream.load_state(state["data"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        resume.restore_rng(state, extra, self.dist, self.config.seed)
        replicas = state.get("world_size", 1) // state.get("context_parallel", 1)
        if replicas != self.dp_size:
            self.warn(f"the checkpoint was written by {replicas} data-parallel process(es), "
                      f"this run has {self.dp_size}; the data order differs from there on")
        self.say(f"resumed from {path} (step {state['step']})")
        return (int(state["step"]), int(state.get("tokens_seen", 0)),
                float(state.get("train_seconds", 0.0)))


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          data: TrainData | None = None, rank: int | None = None, world_size: int | None = None,
          init_method: str | None = None, console: Console | None = None) -> TrainResult:
    """Train a DecoderLM as `config` says and return what happened.

    resume: continue from the newest usable checkpoint in config.out_dir (falling back past
    corrupt ones, with a message), exactly: the same losses as a run that was never stopped.
    The settings that define the run (qkv.train.resume.RUN_DEFINING) must match the
    checkpoint's; others may change and are logged. A run already at max_steps is left as it is
    (result.already_complete). With no checkpoint yet, the run starts afresh with a new log.
    overwrite: start afresh even if out_dir holds checkpoints (otherwise FileExistsError); not
    together with resume (ValueError).
    data: already prepared data (corpus, tokenizer, token streams); built from config if None.
    rank / world_size / init_method: join a DDP group by hand (else torchrun's environment).
    Raises FileNotFoundError / qkv.data.CorpusError for an unusable corpus, CheckpointError
    for a checkpoint that does not fit the model (naming the tensor), ValueError for changed
    run settings, PermissionError/OSError for an out_dir that cannot be written,
    runfolder.RunInUseError while another run holds out_dir, and KeyboardInterrupt with a
    message saying where the run was saved and how to continue.
    """
    device = resolve_device(config.device)
    dist = distributed.setup(device.type, rank=rank, world_size=world_size,
                             init_method=init_method)
    try:
        return Trainer(config, dist, console or Console()).run(resume=resume,
                                                               overwrite=overwrite, data=data)
    finally:
        distributed.teardown(dist)
