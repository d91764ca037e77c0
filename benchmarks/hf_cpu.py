"""A transformers Llama on the CPU under attn_implementation "eager", "sdpa" and "qkv": tokens/s.

A small Llama-shaped model (random init: 4 layers, d_model 256, 8 query heads over 2 K/V heads,
head dim 32) runs
  - forward: one full forward pass (prefill) of batch 1 at several lengths, and of a batch of 4
    left-padded sequences, where every implementation needs a mask;
  - generate: greedy decoding with a DynamicCache after a 128-token prompt.
Each timed pass runs the three implementations in turn on the same model and inputs (so drift
in the machine hits them alike); the table gives the median over the passes. tokens/s counts
input tokens for forward and new tokens for generate.

A second table gives the peak memory of one forward of 2 left-padded sequences above the
memory before it, each in a fresh process: eager builds (B, H, L, L) scores, sdpa a
(B, 1, L, L) mask, qkv neither (its mask function hands qkv a padding vector, not a matrix).

    python benchmarks/hf_cpu.py              # the tables for RESULTS.md (about 3 minutes)
    python benchmarks/hf_cpu.py --quick      # seconds, to see that it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from qkv.bench import memory  # noqa: E402
from qkv.bench.cpu import machine_description  # noqa: E402
from qkv.interop import hf  # noqa: E402

IMPLEMENTATIONS = ("eager", "sdpa", "qkv")


def _model(quick: bool):
    torch.manual_seed(0)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2) if quick else \
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)
    config = transformers.LlamaConfig(vocab_size=1024, max_position_embeddings=8192, **size)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()


def _inputs(B: int, L: int, left_padded: bool):
    g = torch.Generator().manual_seed(L)
    ids = torch.randint(1, 1024, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if left_padded:  # row b starts b * L / 8 tokens late
        for b in range(B):
            mask[b, :b * L // 8] = 0
    return ids, mask


@torch.no_grad()
def _forward(model, ids, mask) -> float:
    start = time.perf_counter()
    model(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


@torch.no_grad()
def _generate(model, ids, mask, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def cases(quick: bool) -> list[dict]:
    """What to time: name, kind, batch, length, left padding."""
    lengths = (64, 128) if quick else (128, 512, 2048)
    out = [dict(kind="forward", B=1, L=L, padded=False) for L in lengths]
    out.append(dict(kind="forward", B=4, L=lengths[-2], padded=True))
    out.append(dict(kind="generate", B=1, L=32 if quick else 128, padded=False))
    return out


def run(quick: bool, passes: int, new_tokens: int) -> list[dict]:
    """One row per (case, implementation), with the median seconds over `passes`."""
    model = _model(quick)
    rows = []
    for case in cases(quick):
        ids, mask = _inputs(case["B"], case["L"], case["padded"])
        times = {impl: [] for impl in IMPLEMENTATIONS}
        for i in range(passes + 1):  # the first pass warms up and is not counted
            for impl in IMPLEMENTATIONS:
                model.set_attn_implementation(impl)
                if case["kind"] == "forward":
                    t = _forward(model, ids, mask)
                else:
                    t = _generate(model, ids, mask, new_tokens)
                if i:
                    times[impl].append(t)
        tokens = int(mask.sum()) if case["kind"] == "forward" else case["B"] * new_tokens
        base = statistics.median(times["eager"])
        for impl in IMPLEMENTATIONS:
            seconds = statistics.median(times[impl])
            rows.append(dict(case, impl=impl, seconds=seconds, tokens_per_s=tokens / seconds,
                             vs_eager=base / seconds))
    return rows


def peak_forward_bytes(impl: str, quick: bool, L: int, threads: int) -> int:
    """Peak resident bytes of one forward of 2 left-padded sequences of L tokens, above the
    resident size before it (run in a fresh process)."""
    torch.set_num_threads(threads)
    memory.return_freed_memory()
    hf.register()
    model = _model(quick)
    model.set_attn_implementation(impl)
    ids, mask = _inputs(2, L, left_padded=True)
    before = memory.resident_bytes()
    memory.reset_peak()
    _forward(model, ids, mask)
    return memory.peak_resident_bytes() - before


def memory_rows(quick: bool, threads: int) -> list[dict]:
    lengths = (256, 512) if quick else (1024, 4096)
    rows = []
    with memory.fresh_processes(["torch", "transformers", "qkv.interop.hf"]) as pool:
        for L in lengths:
            row = dict(L=L)
            for impl in IMPLEMENTATIONS:
                row[impl] = pool.submit(peak_forward_bytes, impl, quick, L, threads).result()
            rows.append(row)
    return rows


def memory_table(rows: list[dict]) -> str:
    lines = ["| batch | length | " + " | ".join(f"{i} peak MiB" for i in IMPLEMENTATIONS) + " |",
             "| ---: | ---: | " + " | ".join("---:" for _ in IMPLEMENTATIONS) + " |"]
    for r in rows:
        cells = " | ".join(f"{r[i] / 2**20:.1f}" for i in IMPLEMENTATIONS)
        lines.append(f"| 2 left-padded | {r['L']} | {cells} |")
    return "\n".join(lines)


def table(rows: list[dict], new_tokens: int) -> str:
    lines = ["| pass | batch | length | implementation | median s | tokens/s | vs eager |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        what = "forward" if r["kind"] == "forward" else f"generate {new_tokens}"
        batch = f"{r['B']} left-padded" if r["padded"] else str(r["B"])
        lines.append(f"| {what} | {batch} | {r['L']} | {r['impl']} | {r['seconds']:.4f} | "
                     f"{r['tokens_per_s']:.0f} | {r['vs_eager']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to see that it runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=None, help="timed passes (default 5)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf.register()
    passes = args.passes or (1 if args.quick else 5)
    new_tokens = args.new_tokens or (4 if args.quick else 64)
    rows = run(args.quick, passes, new_tokens)
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python benchmarks/hf_cpu.py {shown}")
    print(f"machine: {machine_description()}, transformers {transformers.__version__}")
    print(f"median of {passes} interleaved passes\n")
    print(table(rows, new_tokens))
    if not args.no_memory:
        print("\npeak memory of one forward (fresh process each)\n")
        print(memory_table(memory_rows(args.quick, args.threads)))
    return rows


if __name__ == "__main__":
    main()
