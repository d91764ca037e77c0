"""`qkv train`: train a DecoderLM from a TOML config and flags (also under torchrun)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print an unusable corpus, config or checkpoint as one `error: ...` line and exit 1."""
    from qkv.data import CorpusError
    from qkv.train import CheckpointError

    try:
        yield
    except (CorpusError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None


def build_config(config: Path | None, flags: dict[str, Any], assignments: list[str]):
    """TrainConfig from the TOML file, then the `--set` assignments, then the explicit flags."""
    from qkv.train.config import TrainConfig, load_toml, merge, parse_assignments

    values = load_toml(config) if config is not None else {}
    values = merge(values, parse_assignments(assignments))
    values = merge(values, {k: v for k, v in flags.items() if v is not None})
    return TrainConfig.from_dict(values)


def train(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="TOML file of TrainConfig keys (model settings in a \\[model] "
        "table); flags override it")] = None,
    corpus: Annotated[str | None, typer.Option(
        help="'stdlib' (default), a folder, a glob, or a .jsonl file")] = None,
    out_dir: Annotated[str | None, typer.Option(
        help="run folder: checkpoints/, metrics.jsonl, tokenizer.json [runs/train]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps [1000]")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="windows per micro-batch per process [16]")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="micro-batches per step [1]")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per window [128]")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate [2e-3]")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="bpe or byte [bpe]")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="BPE vocabulary size [2048]")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="corpus size cap [3000000]")] = None,
    precision: Annotated[str | None, typer.Option(
        help="fp32, bf16 (autocast) or fp16 (CUDA, with GradScaler) [fp32]")] = None,
    activation_checkpointing: Annotated[bool | None, typer.Option(
        "--activation-checkpointing/--no-activation-checkpointing",
        help="recompute layer activations in the backward pass")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda [auto]")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of init, data order, dropout [0]")]
        = None,
    time_limit: Annotated[float | None, typer.Option(
        help="stop (and save) after this many seconds of training")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads per process")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="any other setting, repeatable: key=value or model.key=value "
        "(e.g. --set model.d_model=256 --set warmup_steps=100)")] = None,
    resume: Annotated[bool, typer.Option(
        help="continue from the newest usable checkpoint in the run folder")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="start afresh even if the run folder holds checkpoints")] = False,
    progress: Annotated[bool, typer.Option(help="show the live progress bar")] = True,
) -> None:
    """Train a DecoderLM language model on a text corpus.

    Settings come from TrainConfig's defaults, then --config FILE, then --set, then the flags.
    Under `torchrun --nproc_per_node N -m qkv train ...` it trains with DistributedDataParallel
    (gloo on the CPU, NCCL on CUDA); rank 0 alone writes checkpoints and logs.
    """
    from qkv.train import train as run_training

    flags = {"corpus": corpus, "out_dir": out_dir, "max_steps": max_steps,
             "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len, "lr": lr,
             "tokenizer": tokenizer, "vocab_size": vocab_size, "max_bytes": max_bytes,
             "precision": precision, "activation_checkpointing": activation_checkpointing,
             "device": device, "seed": seed, "time_limit": time_limit, "threads": threads,
             "progress": None if progress else False}
    with user_errors():
        cfg = build_config(config, flags, set_ or [])
        result = run_training(cfg, resume=resume, overwrite=overwrite)
    if result.rank == 0 and result.eval is not None:
        typer.echo(f"done: step {result.step}, validation {result.eval['bpb']:.3f} bits/byte, "
                   f"{result.tokens_per_s:,.0f} tokens/s")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
