"""qkv's main job end to end: corpus, tokenizer, training, evaluation against the byte bigram,
a checkpoint, and a streamed code completion."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qkv.data import BigramModel
from qkv.generate import complete
from qkv.io import atomic_write_text
from qkv.train.checkpoint import CheckpointError, list_checkpoints, load_model, read_run_config
from qkv.train.config import TrainConfig
from qkv.train.data import build_tokenizer, load_corpus, prepare_data
from qkv.train.evaluate import evaluate
from qkv.train.layout import STEP_DIR
from qkv.train.loop import train
from qkv.train.metrics import METRICS_FILE, read_records
from qkv.train.resume import run_defining, setting_changes
from qkv.train.runfolder import RunLock, check_writable, discard

DEFAULT_PROMPT = "def fibonacci(n):\n"
DEFAULT_NEW_TOKENS = 80  # silently fewer where the model's max_len leaves fewer
REPORT = "demo.json"

# Sized to finish in about 4 minutes on 2 CPU cores, with a time limit on training as a guard for
# slower or busier machines (the model passes the bigram within its first ~150 steps).
DEMO = {
    "corpus": "stdlib", "max_bytes": 3_000_000, "tokenizer": "bpe", "vocab_size": 2048,
    "seq_len": 128, "model": {"d_model": 128, "n_layers": 4, "n_heads": 4},
    "batch_size": 16, "max_steps": 500, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 30,
    "eval_interval": 250, "eval_batches": 10, "log_interval": 10, "checkpoint_interval": 250,
    "keep_checkpoints": 1, "time_limit": 200.0,
}
# The demo in seconds, for tests: the same run, smaller everywhere.
QUICK = {
    **DEMO, "max_bytes": 400_000, "vocab_size": 512, "seq_len": 64,
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 2}, "batch_size": 8, "max_steps": 150,
    "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "eval_interval": 1000, "eval_batches": 4,
    "checkpoint_interval": 1000, "time_limit": 10.0,
}


def fastest_thread_count() -> int:
    """1 or all of torch's threads, whichever multiplies matrices faster here and now.

    On a busy machine several OpenMP threads can be many times slower than one.
    """
    import torch

    most = torch.get_num_threads()
    if most == 1:
        return 1
    a = torch.randn(256, 256)
    timings = {}
    for n in (1, most):
        torch.set_num_threads(n)
        a @ a  # warm up
        start = time.perf_counter()
        for _ in range(20):
            a @ a
        timings[n] = time.perf_counter() - start
    torch.set_num_threads(most)
    return min(timings, key=timings.get)


def demo_config(*, quick: bool = False, out_dir: str = "runs/demo",
                **overrides: Any) -> TrainConfig:
    """The demo's TrainConfig (QUICK is a seconds-long version for tests)."""
    return TrainConfig.from_dict({**(QUICK if quick else DEMO), "out_dir": out_dir, **overrides})


def is_demo_run(out_dir: str | Path) -> bool:
    """Whether the run in `out_dir` is exactly what a demo makes: its saved settings that define
    a run (corpus, tokenizer, model, data order, ...) are those of DEMO or QUICK, its newest
    checkpoint is no further than that demo's max_steps, and it was never resumed (a run the
    user trained further is theirs, not the demo's to replace)."""
    try:
        saved = read_run_config(out_dir)
        steps = [int(STEP_DIR.match(path.name).group(1)) for path in list_checkpoints(out_dir)]
        records = read_records(Path(out_dir) / METRICS_FILE)
    except (OSError, ValueError, CheckpointError):
        return False
    if any(record.get("kind") == "resume" for record in records):
        return False
    for quick in (False, True):
        config = demo_config(quick=quick, out_dir=str(out_dir))
        if not run_defining(setting_changes(saved, config)):
            return max(steps, default=0) <= config.max_steps
    return False


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an out_dir that a run is using, or that holds the checkpoints of a run that is
    not an earlier demo's (unless `overwrite`)."""
    lock = RunLock(out_dir)
    lock.acquire()  # RunInUseError now rather than after the corpus and tokenizer
    lock.release()
    if list_checkpoints(out_dir) and not overwrite and not is_demo_run(out_dir):
        raise FileExistsError(f"{out_dir} holds a training run's checkpoints; pick another "
                              f"--out, or pass --overwrite to replace that run")


def run_demo(*, quick: bool = False, out_dir: str = "runs/demo", prompt: str = DEFAULT_PROMPT,
             max_new_tokens: int | None = None, console: Console | None = None,
             overwrite: bool = False, **overrides: Any) -> dict[str, Any]:
    """Run the demo, print what happens, write OUT/demo.json, and return the report.

    An out_dir that cannot be written, is in use, or holds checkpoints of a run other than an
    earlier demo (unless `overwrite`) is refused before any work (PermissionError, OSError,
    FileExistsError naming the folder and `--out`). A demo that fails before its first
    checkpoint leaves no folder it made. The report is written atomically (qkv.io).
    max_new_tokens: None for the demo's own DEFAULT_NEW_TOKENS, quietly capped to what the
    model's max_len leaves; a number given here that runs past it is capped with a UserWarning.
    """
    created = False
    try:
        created = check_writable(out_dir)
        check_out_dir(out_dir, overwrite)
        return _run_demo(quick, out_dir, prompt, max_new_tokens, console or Console(),
                         overrides)
    except BaseException as e:
        if created:
            discard(out_dir, extra=(REPORT,))
        if isinstance(e, OSError) and "another out_dir" in str(e):  # the demo's flag is --out
            error = type(e)(str(e).replace("another out_dir", "another --out"))
            error.errno = e.errno
            raise error from e
        raise


def _run_demo(quick: bool, out_dir: str, prompt: str, max_new_tokens: int | None,
              console: Console, overrides: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    if "threads" not in overrides:
        overrides["threads"] = fastest_thread_count()
    config = demo_config(quick=quick, out_dir=out_dir, **overrides)
    console.rule("[bold]qkv demo" + (" (quick)" if quick else ""))

    t = time.perf_counter()
    corpus = load_corpus(config)
    stats = corpus.stats()
    files = sum(v["files"] for v in stats.values())
    megabytes = sum(v["bytes"] for v in stats.values()) / 1e6
    splits = ", ".join(f"{s} {v['files']}" for s, v in stats.items())
    console.print(f"corpus: the Python standard library, {files} files, {megabytes:.2f} MB "
                  f"({splits}) [{time.perf_counter() - t:.1f} s]")
    t = time.perf_counter()
    tokenizer = build_tokenizer(config, corpus)
    data = prepare_data(config, corpus=corpus, tokenizer=tokenizer)
    n_bytes = stats["train"]["bytes"]
    console.print(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens, "
                  f"{n_bytes / len(data.streams['train']):.2f} bytes per token "
                  f"[{time.perf_counter() - t:.1f} s]")

    bigram = BigramModel.fit(corpus.texts("train"))
    bigram_bpb = bigram.bits_per_byte(corpus.texts("test"))

    result = train(config, overwrite=True, data=data, console=console)

    model, tokenizer, folder = load_model(result.checkpoint)
    test = evaluate(model, data.windows("test", config.seq_len), data.token_bytes,
                    batch_size=config.batch_size)
    table = Table(title="test split (documents the model never saw)")
    table.add_column("model")
    table.add_column("bits per byte", justify="right")
    table.add_row("byte bigram (Kneser-Ney)", f"{bigram_bpb:.3f}")
    table.add_row(f"DecoderLM, {model.num_params() / 1e6:.1f}M params, {result.step} steps",
                  f"{test['bpb']:.3f}")
    console.print(table)
    beats = test["bpb"] < bigram_bpb
    verdict = (f"[green]the Transformer beats the bigram by {bigram_bpb - test['bpb']:.3f} "
               f"bits per byte[/green]" if beats else
               "[red]the Transformer does NOT beat the bigram: train longer[/red]")
    console.print(verdict)
    console.print(f"training: {result.tokens_per_s:,.0f} tokens/s on {config.threads} "
                  f"thread(s), {result.train_seconds:.0f} s; checkpoint: {folder}")

    console.rule(f"completion of {prompt!r}")
    console.print(prompt, end="", highlight=False, markup=False)
    with warnings.catch_warnings():
        if max_new_tokens is None:  # the demo's own length: capped to the model without a word
            warnings.filterwarnings("ignore", message=r"max_new_tokens=\d+ is capped",
                                    category=UserWarning)
        text = complete(model, tokenizer, prompt,
                        max_new_tokens=max_new_tokens or DEFAULT_NEW_TOKENS, temperature=0.8,
                        top_k=40, on_text=lambda piece: console.print(
                            piece, end="", highlight=False, markup=False))
    console.print()
    console.rule()
    report = {
        "quick": quick, "steps": result.step, "stopped_early": result.stopped_early,
        "params": model.num_params(), "test_bpb": test["bpb"], "test_loss": test["loss"],
        "bigram_test_bpb": bigram_bpb, "beats_bigram": beats,
        "tokens_per_s": result.tokens_per_s, "threads": config.threads,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - start, "checkpoint": str(folder),
        "prompt": prompt, "completion": text,
    }
    atomic_write_text(Path(out_dir) / REPORT, json.dumps(report, indent=1) + "\n")
    console.print(f"done in {report['wall_seconds']:.0f} s; report: {Path(out_dir) / REPORT}")
    return report
