"""Where a cached decoding step's time goes on the CPU: attention, cache update, the rest.

The model and contexts are those of benchmarks/decode_cpu.py (DecoderLM d 256, 4 layers, 4 heads,
RoPE; contexts 512 / 2k / 8k). After the (untimed) prefill, `steps` single tokens are decoded
greedily; each step is timed whole, and inside it, with `time.perf_counter` around each call
(eager CPU ops are synchronous, so a timer around a call measures that call):

  attention     `qkv.attention` over the cached keys, all layers (mask building included);
  cache update  `cache.update(...)`, all layers (DynamicCache's append, StaticCache's write);
  rest          everything else: embedding, projections, RoPE, MLP, norms, LM head, Python.

Beside them, "read K/V" is the time to read as many bytes as the cache holds at that context
(a `sum` over float32 tensors of the cached K and V shapes, every layer) and "copy K/V" the
time to copy them once into tensors already allocated: the memory traffic attention cannot go
below, and the traffic of re-concatenating the whole cache (which also allocates, and so
faults in fresh pages). "torch SDPA" is torch's own kernel attending one query to those
tensors, without qkv in between. Per-token figures are medians over the steps.

    python benchmarks/decode_breakdown_cpu.py            # the tables for RESULTS.md
    python benchmarks/decode_breakdown_cpu.py --quick    # seconds, for the tests
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

import qkv
from qkv.nn import DynamicCache, StaticCache

PARTS = ("attention", "cache update", "rest")


def _decode_cpu():
    """benchmarks/decode_cpu.py, for its model: both benchmarks time the same network."""
    path = Path(__file__).resolve().parent / "decode_cpu.py"
    spec = importlib.util.spec_from_file_location("decode_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _timed(cache, spent: dict[str, float]):
    """Add the seconds spent in `qkv.attention` and in `cache.update` to `spent`."""
    attention, update = qkv.attention, cache.update

    def wrap(fn, label):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[label] += time.perf_counter() - start
            return out
        return timed

    qkv.attention, cache.update = wrap(attention, "attention"), wrap(update, "cache update")
    try:
        yield
    finally:
        qkv.attention = attention
        del cache.update  # back to the class's method


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_seconds(model, context: int, repeats: int = 5) -> dict[str, float]:
    """Seconds to read (sum) and to copy every layer's K and V at `context` keys, and for
    torch's own SDPA to attend one query to them (every layer, no mask)."""
    c = model.config
    head_dim = c.d_model // c.n_heads
    shape = (1, c.n_kv_heads or c.n_heads, context, head_dim)
    tensors = [torch.randn(shape) for _ in range(2 * c.n_layers)]
    copies = [torch.empty_like(t) for t in tensors]
    q = torch.randn(shape[0], c.n_heads, 1, head_dim)
    pairs = list(zip(tensors[0::2], tensors[1::2], strict=True))
    return {
        "sdpa": _median_seconds(
            lambda: [F.scaled_dot_product_attention(q, k, v) for k, v in pairs], repeats),
        "read": _median_seconds(lambda: [t.sum() for t in tensors], repeats),
        "copy": _median_seconds(
            lambda: [d.copy_(t) for d, t in zip(copies, tensors, strict=True)], repeats),
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
    }


@torch.no_grad()
def breakdown(model, context: int, cache_kind: str, steps: int) -> dict[str, float]:
    """Median seconds per decoded token: total and each of PARTS, after a prefill of `context`."""
    torch.manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (1, context))
    cache = DynamicCache() if cache_kind == "dynamic" else StaticCache(context + steps + 2)
    logits, _ = model(idx, cache=cache, last_only=True)
    per_step = defaultdict(list)
    for i in range(steps + 1):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        spent = defaultdict(float)
        with _timed(cache, spent):
            start = time.perf_counter()
            logits, _ = model(tok, cache=cache, last_only=True)
            total = time.perf_counter() - start
        if i == 0:
            continue  # the first step pays one-off costs (the mask's first build, allocation)
        per_step["total"].append(total)
        per_step["attention"].append(spent["attention"])
        per_step["cache update"].append(spent["cache update"])
        per_step["rest"].append(total - spent["attention"] - spent["cache update"])
    return {k: statistics.median(v) for k, v in per_step.items()}


def run(contexts: list[int], steps: int, quick: bool, caches=("static", "dynamic")) -> list[dict]:
    model = _decode_cpu()._model(quick)
    rows = []
    for L in contexts:
        memory = memory_seconds(model, L)
        for kind in caches:
            parts = breakdown(model, L, kind, steps)
            ms = {k: round(1e3 * v, 3) for k, v in parts.items()}
            rows.append(dict(
                context=L, cache=kind, total_ms=ms["total"], attention_ms=ms["attention"],
                update_ms=ms["cache update"], rest_ms=ms["rest"],
                read_ms=round(1e3 * memory["read"], 3), copy_ms=round(1e3 * memory["copy"], 3),
                sdpa_ms=round(1e3 * memory["sdpa"], 3),
                kv_mib=round(memory["bytes"] / 2**20, 2),
                attention_over_read=round(parts["attention"] / memory["read"], 2),
            ))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; ms per token, median over the steps")
    print("| context | cache | total | attention | cache update | rest | K/V MiB | read K/V | "
          "copy K/V | torch SDPA | attention / read |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['context']} | {r['cache']} | {r['total_ms']} | {r['attention_ms']} | "
              f"{r['update_ms']} | {r['rest_ms']} | {r['kv_mib']} | {r['read_ms']} | "
              f"{r['copy_ms']} | {r['sdpa_ms']} | {r['attention_over_read']} |")
    for kind in dict.fromkeys(r["cache"] for r in rows):
        mine = [r for r in rows if r["cache"] == kind]
        if len(mine) > 1:
            print(f"{kind}: {mine[-1]['context']} / {mine[0]['context']} per-token ratio "
                  f"{mine[-1]['total_ms'] / mine[0]['total_ms']:.2f}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--steps", type=int, default=None, help="timed tokens per context")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = args.contexts or ([32, 64] if args.quick else [512, 2048, 8192])
    rows = run(contexts, args.steps or (2 if args.quick else 16), args.quick)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
