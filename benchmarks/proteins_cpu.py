"""Protein figures on this CPU: a short `qkv train --corpus proteins` run, its bits per residue
on the test split beside unigram and bigram baselines, the padding fraction with and without
length bucketing, and the peak memory of one forward + backward of the trained model's shape on
the longest sequence, `chunked` against `reference`, each in a fresh process (the growth of the
resident high-water mark over the model, its gradients and the inputs).

    python benchmarks/proteins_cpu.py [--steps 40] [--out runs/proteins] [--json FILE]

One torch thread throughout (the machine is shared). Prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

SEQ_LEN = 4560  # the longest input: eos + the 4,559 residues of the longest sequence
MAX_TOKENS = 8192
BATCH_SIZE = 16


def run_config(steps: int, out_dir: str) -> dict:
    return {"corpus": "proteins", "seq_len": SEQ_LEN, "max_tokens": MAX_TOKENS,
            "batch_size": BATCH_SIZE, "max_steps": steps, "warmup_steps": max(1, steps // 10),
            "lr": 3e-3, "min_lr": 3e-4, "eval_interval": steps, "eval_batches": 1,
            "log_interval": 5, "checkpoint_interval": steps, "threads": 1, "progress": False,
            "device": "cpu", "out_dir": out_dir,
            "model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "backend": "chunked"}}


def step_memory(model_config: dict, n: int, backend: str) -> dict:
    """Peak resident memory growth of one forward + backward of DecoderLM(model_config) on one
    sequence of n tokens with `backend`, over the model and its inputs (run in a fresh
    process)."""
    from qkv.bench import memory
    from qkv.nn import DecoderLM, TransformerConfig

    torch.set_num_threads(1)
    model = DecoderLM(TransformerConfig.from_dict({**model_config, "backend": backend}))
    x = torch.randint(3, model_config["vocab_size"], (1, n + 1))
    _, loss = model(x[:, :64], x[:, 1:65])  # warm-up: code, thread pools
    loss.backward()
    model.zero_grad(set_to_none=False)
    rss0 = memory.resident_bytes()
    if not memory.reset_peak():  # the peak must be this step's, not the imports'
        raise OSError("cannot reset the memory high-water mark (/proc/self/clear_refs)")
    start = time.perf_counter()
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    seconds = time.perf_counter() - start
    peak = memory.peak_resident_bytes() - rss0
    return {"backend": backend, "n": n, "peak_bytes": peak, "seconds": seconds}


def measure_memory(model_config: dict, n: int) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    rows = []
    for backend in ("reference", "chunked"):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            rows.append(pool.submit(step_memory, model_config, n, backend).result())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/proteins")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from qkv.data import (
        LMWindows,
        bits_per_residue,
        ngram_bits_per_residue,
        padding_fractions,
        sequence_examples,
        token_stream,
    )
    from qkv.train import TrainConfig, train
    from qkv.train.checkpoint import load_model
    from qkv.train.data import load_corpus, token_byte_lengths
    from qkv.train.evaluate import evaluate

    config = TrainConfig.from_dict(run_config(args.steps, args.out))
    start = time.perf_counter()
    result = train(config, overwrite=True)
    train_seconds = time.perf_counter() - start
    model, tok, _ = load_model(result.checkpoint)
    corpus = load_corpus(config)
    ids = {s: tok.encode_batch(corpus.texts(s)) for s in ("train", "validation", "test")}
    test = bits_per_residue(model, ids["test"], eos_id=tok.eos_id, pad_id=tok.pad_id,
                            max_len=SEQ_LEN, max_tokens=MAX_TOKENS)
    baselines = ngram_bits_per_residue(ids["train"], ids["test"], vocab_size=tok.vocab_size,
                                       eos_id=tok.eos_id)
    # A few sequences hold long runs of X (masked regions), which a bigram predicts well.
    plain = [t for t, text in zip(ids["test"], corpus.texts("test"), strict=True)
             if "X" not in text]
    test_plain = bits_per_residue(model, plain, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                  max_len=SEQ_LEN, max_tokens=MAX_TOKENS)
    baselines_plain = ngram_bits_per_residue(ids["train"], plain, vocab_size=tok.vocab_size,
                                             eos_id=tok.eos_id)
    windows = LMWindows(token_stream(ids["test"], tok.eos_id), 512)
    stream = evaluate(model, windows, token_byte_lengths(tok), batch_size=8)
    lengths = [len(e) - 1 for e in sequence_examples(ids["train"], tok.eos_id, SEQ_LEN)]
    padding = padding_fractions(lengths, batch_size=BATCH_SIZE, max_tokens=MAX_TOKENS,
                                seed=config.seed)
    longest = max(len(t) for split in ids.values() for t in split)
    model_config = dataclasses.asdict(model.config)
    memory = measure_memory(model_config, longest + 1)
    figures = {"steps": args.steps, "train_seconds": train_seconds,
               "params": model.num_params(), "test": test, "baselines": baselines,
               "test_sequences": len(ids["test"]), "test_plain": test_plain,
               "baselines_plain": baselines_plain, "plain_sequences": len(plain),
               "stream_windows_512": stream, "padding": padding, "memory": memory,
               "longest_residues": longest, "final_train_loss": result.losses[args.steps]}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    print(markdown(figures))


def markdown(f: dict) -> str:
    mib = 2**20
    ref, chunked = f["memory"]
    lines = [
        f"Short run: {f['steps']} steps of {MAX_TOKENS} padded tokens at most (batch_size "
        f"{BATCH_SIZE}, seq_len {SEQ_LEN}), DecoderLM {f['params']:,} parameters, `chunked` "
        f"backend, 1 thread, {f['train_seconds']:.0f} s.",
        "",
        f"| bits per residue | test split ({f['test_sequences']} sequences, "
        f"{f['baselines']['residues']:,} residues) | without the "
        f"{f['test_sequences'] - f['plain_sequences']} holding runs of X "
        f"({f['baselines_plain']['residues']:,} residues) |",
        "|---|---|---|",
        f"| unigram (add-one, fitted on train) | {f['baselines']['unigram']:.3f} | "
        f"{f['baselines_plain']['unigram']:.3f} |",
        f"| bigram (add-one, fitted on train) | {f['baselines']['bigram']:.3f} | "
        f"{f['baselines_plain']['bigram']:.3f} |",
        f"| DecoderLM, whole sequences | {f['test']['bits_per_residue']:.3f} | "
        f"{f['test_plain']['bits_per_residue']:.3f} |",
        f"| DecoderLM, trainer's bits per byte (windows of 512 over the stream) | "
        f"{f['stream_windows_512']['bpb']:.3f} | |",
        "",
        f"Padding (training split, batch_size {BATCH_SIZE}, max_tokens {MAX_TOKENS}): "
        f"{100 * f['padding']['bucketed']:.1f}% with length bucketing "
        f"({f['padding']['bucketed_batches']} batches), {100 * f['padding']['random']:.1f}% "
        f"without ({f['padding']['random_batches']} batches).",
        "",
        f"One forward + backward on the longest sequence ({f['longest_residues']:,} residues, "
        f"{ref['n']:,} input tokens), peak resident memory growth: `reference` "
        f"{ref['peak_bytes'] / mib:,.0f} MiB ({ref['seconds']:.1f} s), `chunked` "
        f"{chunked['peak_bytes'] / mib:,.0f} MiB ({chunked['seconds']:.1f} s).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
