"""Decode speed on the CPU: tokens/s with a KV cache vs recomputing the whole context.

A small DecoderLM (RoPE, pre-LN) reads a random context of 512 / 2k / 8k tokens, then generates
`new_tokens` greedily. "dynamic" feeds one token per step through a DynamicCache (the prefill is
not timed); "none" recomputes the full sequence at every step, as decoding without a cache does.

    python benchmarks/decode_cpu.py            # the table for RESULTS.md
    python benchmarks/decode_cpu.py --quick    # seconds, for the tests
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from qkv.nn import DecoderLM, DynamicCache, TransformerConfig


def _model(quick: bool, backend: str = "auto") -> DecoderLM:
    torch.manual_seed(0)
    size = dict(d_model=64, n_layers=2, n_heads=2) if quick else \
        dict(d_model=256, n_layers=4, n_heads=4)
    cfg = TransformerConfig(vocab_size=1024, positions="rope", dropout=0.0, backend=backend,
                            **size)
    return DecoderLM(cfg).eval()


@torch.no_grad()
def _decode(model: DecoderLM, context: torch.Tensor, new_tokens: int, cached: bool) -> float:
    """Seconds to generate `new_tokens` greedy tokens after `context` (1, L)."""
    if cached:
        cache = DynamicCache()
        logits, _ = model(context, cache=cache, last_only=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            logits, _ = model(tok, cache=cache, last_only=True)
        return time.perf_counter() - start
    seq = context
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, _ = model(seq, last_only=True)
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return time.perf_counter() - start


def run(contexts: list[int], new_tokens: int, quick: bool, backend: str = "auto") -> list[dict]:
    """One row per (context, cache): seconds, tokens/s and the speedup of the cache."""
    model = _model(quick, backend)
    rows = []
    for L in contexts:
        context = torch.randint(0, model.config.vocab_size, (1, L))
        timing = {c: _decode(model, context, new_tokens, c) for c in (True, False)}
        for cached in (True, False):
            seconds = timing[cached]
            rows.append(dict(
                context=L, backend=backend, cache="dynamic" if cached else "none",
                new_tokens=new_tokens,
                seconds=round(seconds, 4), tokens_per_s=round(new_tokens / seconds, 2),
                speedup=round(timing[False] / timing[True], 1) if cached else 1.0,
            ))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| context | backend | cache | new tokens | seconds | tokens/s | speedup |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['context']} | {r['backend']} | {r['cache']} | {r['new_tokens']} | "
              f"{r['seconds']} | {r['tokens_per_s']} | {r['speedup']} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--backend", default="auto", help="qkv.attention backend")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [32, 64] if args.quick else [512, 2048, 8192]
    new_tokens = args.new_tokens or (2 if args.quick else 8)
    rows = run(contexts, new_tokens, args.quick, args.backend)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
