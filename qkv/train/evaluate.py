"""Evaluation of a language model on a split: loss, perplexity and bits per byte."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from qkv.data import SPLITS, BigramModel, CorpusError, LMWindows, token_stream
from qkv.device import resolve_device
from qkv.nn import IGNORE_INDEX
from qkv.train.checkpoint import load_model, read_run_config
from qkv.train.config import TrainConfig
from qkv.train.data import load_corpus, token_byte_lengths
from qkv.train.distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: LMWindows, token_bytes: torch.Tensor, *,
             batch_size: int, max_batches: int | None = None, device: str | torch.device = "cpu",
             autocast: AbstractContextManager | None = None,
             dist: DistInfo | None = None,
             replica: tuple[int, int] | None = None) -> dict[str, float]:
    """Mean next-token loss over `windows`: all of them, or the first max_batches global batches
    (max_batches * batch_size * replicas windows).

    Returns {"loss": nats per token, "ppl": exp(loss), "bpb": bits per byte, "tokens", "bytes"}.
    Bits per byte is the summed NLL in bits over the UTF-8 bytes the target tokens stand for
    (`token_bytes` (V,); eos counts as no bytes), so it compares models with any tokenizer.
    Under DDP each process takes every world_size-th window and the sums are all-reduced.
    `replica` (index, replicas) says which share of the windows this process takes when that
    differs from (rank, world_size): under context parallelism every process of a group takes
    its group's share, and `model` (a qkv.distributed.ContextParallelLM) scores its own shard of
    each window, whose targets its `shard_targets` cuts.
    """
    dist = dist or DistInfo()
    index, replicas = replica or (dist.rank, dist.world_size)
    n = len(windows) if max_batches is None else min(len(windows),
                                                     max_batches * batch_size * replicas)
    if n == 0:
        raise ValueError("evaluation needs at least one window")
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    mine = list(range(index, n, replicas))
    for start in range(0, len(mine), batch_size):
        xs, ys = zip(*(windows[i] for i in mine[start:start + batch_size]), strict=True)
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)  # (b, L)
        with autocast or nullcontext():
            logits, _ = model(x)  # (b, L, V), or (b, L/N, V) for a shard
        if hasattr(model, "shard_targets"):
            y = model.shard_targets(y)  # padding past L is IGNORE_INDEX
        scored = y != IGNORE_INDEX
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum",
                              ignore_index=IGNORE_INDEX)
        sums += torch.stack([nll.double(), scored.sum().double(),
                             (token_bytes[y.clamp(min=0)] * scored).sum().double()])
    all_reduce_sum(sums, dist)
    model.train(was_training)
    nll, tokens, nbytes = sums.tolist()
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "bpb": nll / (max(nbytes, 1.0) * math.log(2)), "tokens": int(tokens),
            "bytes": int(nbytes)}


# The settings of a run that decide which text its splits hold.
CORPUS_KEYS = ("corpus", "max_bytes", "max_files", "suffixes", "text_key", "split",
               "split_fractions", "seq_len")


def evaluate_checkpoint(path, *, split: str = "test", corpus: str | None = None,
                        max_bytes: int | None = None, batch_size: int = 16,
                        max_batches: int | None = None, device: str | torch.device = "cpu",
                        warn: Callable[[str], None] | None = None) -> dict[str, float | int | str]:
    """A checkpoint's loss, perplexity and bits per byte on a corpus split, beside the byte
    bigram fitted to the same corpus's training split.

    The corpus, its caps and its split default to those the checkpoint was trained on (its run
    config, qkv.train.checkpoint.read_run_config); `corpus` / `max_bytes` override them. A
    fallback from a damaged newest checkpoint is reported through `warn` (default:
    `warnings.warn`; nothing is printed). Raises CheckpointError, FileNotFoundError or
    CorpusError with a message that names the problem; ValueError for an unknown split or a
    device this machine lacks (qkv.device.resolve_device: "auto", "cpu", "cuda", "cuda:N").
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    device = resolve_device(device)
    model, tokenizer, folder = load_model(path, device=device, warn=warn or _warn)
    saved = read_run_config(folder)
    values = {k: saved[k] for k in CORPUS_KEYS if k in saved}
    if saved and "split" not in saved:
        values["split"] = "document"  # runs from before split existed split by document
    if corpus is not None:
        values["corpus"] = corpus
    if max_bytes is not None:
        values["max_bytes"] = max_bytes
    config = TrainConfig.from_dict(values)
    data = load_corpus(config)
    texts = data.texts(split)
    stream = token_stream(tokenizer.encode_batch(texts), tokenizer.eos_id)
    seq_len = min(config.seq_len, model.config.max_len)
    windows = LMWindows(stream, seq_len)
    if len(windows) == 0:
        raise CorpusError(f"the {split} split of {config.corpus!r} has {len(stream)} tokens, "
                          f"fewer than one window of {seq_len + 1}")
    metrics = evaluate(model, windows, token_byte_lengths(tokenizer), batch_size=batch_size,
                       max_batches=max_batches, device=device)
    bigram = BigramModel.fit(data.texts("train")).bits_per_byte(texts)
    return {"checkpoint": str(folder), "split": split, "corpus": config.corpus, **metrics,
            "bigram_bpb": bigram}


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=2)
