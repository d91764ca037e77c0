"""`qkv train`: train a DecoderLM from a TOML config and flags (also under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def build_config(config: Path | None, flags: dict[str, Any], assignments: list[str], *,
                 resume: bool = False):
    """TrainConfig from the TOML file, then the `--set` assignments, then the explicit flags.

    With `resume`, the settings the run folder was trained with come first, so that
    `qkv train --out-dir RUN --resume --max-steps N` needs none of the original flags.
    """
    from qkv.train.config import TrainConfig, load_toml, merge, parse_assignments

    values = load_toml(config) if config is not None else {}
    values = merge(values, parse_assignments(assignments))
    values = merge(values, {k: v for k, v in flags.items() if v is not None})
    if resume:
        out_dir = values.get("out_dir", TrainConfig.out_dir)
        values = {**merge(_saved_settings(out_dir), values), "out_dir": out_dir}
    return TrainConfig.from_dict(values)


def _saved_settings(out_dir: str) -> dict[str, Any]:
    """The settings a run folder was trained with; {} if it holds no usable record of them."""
    from qkv.train import CheckpointError
    from qkv.train.checkpoint import read_run_config

    try:
        return read_run_config(out_dir)
    except (FileNotFoundError, CheckpointError):
        return {}


def _setting(help: str, default: str, *names: str):
    """An option whose unset value means TrainConfig's default, shown in --help."""
    return typer.Option(*names, help=help, show_default=default)


def train(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="TOML file of TrainConfig keys (model settings in a \\[model] "
        "table); flags override it")] = None,
    corpus: Annotated[str | None, _setting(
        "'stdlib', 'proteins', a folder, a glob, a .jsonl file, or a FASTA file (.fa, .fasta, "
        ".faa; .gz too)", "stdlib")] = None,
    out_dir: Annotated[str | None, _setting(
        "run folder: checkpoints/, metrics.jsonl, tokenizer.json", "runs/train")] = None,
    max_steps: Annotated[int | None, _setting("optimizer steps", "1000")] = None,
    batch_size: Annotated[int | None, _setting("windows per micro-batch per process", "16")]
        = None,
    grad_accum: Annotated[int | None, _setting("micro-batches per step", "1")] = None,
    seq_len: Annotated[int | None, _setting("tokens per window", "128")] = None,
    lr: Annotated[float | None, _setting("peak learning rate", "0.002")] = None,
    tokenizer: Annotated[str | None, _setting(
        "bpe, byte, or residue (protein corpora, where it is the default)", "bpe")] = None,
    vocab_size: Annotated[int | None, _setting("BPE vocabulary size", "2048")] = None,
    max_bytes: Annotated[int | None, _setting("corpus size cap", "3000000")] = None,
    precision: Annotated[str | None, _setting(
        "fp32, bf16 (autocast) or fp16 (CUDA, with GradScaler)", "fp32")] = None,
    activation_checkpointing: Annotated[bool | None, _setting(
        "recompute layer activations in the backward pass", "no-activation-checkpointing",
        "--activation-checkpointing/--no-activation-checkpointing")] = None,
    device: Annotated[str | None, _setting("auto, cpu, cuda or cuda:N", "auto")] = None,
    seed: Annotated[int | None, _setting("seed of init, data order, dropout", "0")] = None,
    time_limit: Annotated[float | None, _setting(
        "stop (and save) after this many seconds of training", "no limit")] = None,
    threads: Annotated[int | None, _setting("torch CPU threads per process", "torch's")] = None,
    context_parallel: Annotated[int | None, _setting(
        "processes that share each sequence (under torchrun; the process count must be a "
        "multiple, the rest is data parallel)", "1")] = None,
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
    (gloo on the CPU, NCCL on CUDA); rank 0 alone writes checkpoints and logs. Context
    parallelism (--context-parallel N) makes each group of N processes share every sequence (a
    zigzag shard each, attention by a ring of K/V blocks); the groups are data parallel.
    """
    from qkv.cli._errors import user_errors
    from qkv.train import train as run_training

    flags = {"corpus": corpus, "out_dir": out_dir, "max_steps": max_steps,
             "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len, "lr": lr,
             "tokenizer": tokenizer, "vocab_size": vocab_size, "max_bytes": max_bytes,
             "precision": precision, "activation_checkpointing": activation_checkpointing,
             "device": device, "seed": seed, "time_limit": time_limit, "threads": threads,
             "context_parallel": context_parallel, "progress": None if progress else False}
    with user_errors():
        if device is not None:
            from qkv.device import resolve_device

            resolve_device(device)
        cfg = build_config(config, flags, set_ or [], resume=resume)
        result = run_training(cfg, resume=resume, overwrite=overwrite)
    if result.rank == 0 and result.eval is not None:
        typer.echo(f"done: step {result.step}, validation {result.eval['bpb']:.3f} bits/byte, "
                   f"{result.tokens_per_s:,.0f} tokens/s")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
