"""MiniLM sentence-embedding throughput on the CPU: qkv.embed beside sentence-transformers.

    python benchmarks/embed_cpu.py            # 512 sentences, 3 timed passes each
    python benchmarks/embed_cpu.py --quick    # 128 sentences, 1 timed pass

Both run in this process on the same sentences (mixed lengths, 3 to ~200 tokens), batch size
32, with torch's thread count fixed. Each side encodes the whole list once to warm up, then the
timed passes alternate between the two; the median is reported as sentences/s (and process CPU
seconds, steadier on a shared machine), with the ratio qkv / sentence-transformers and the
largest difference between the two sets of vectors.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WORDS = (
    "attention", "query", "key", "value", "softmax", "token", "layer", "model", "sentence",
    "vector", "embedding", "the", "a", "of", "and", "to", "in", "is", "on", "for", "with", "that",
    "by", "from", "at", "as", "cat", "dog", "river", "mountain", "city", "learning", "memory",
    "linear", "exact", "transformer", "encoder", "decoder", "python", "tensor", "batch", "café",
    "naïve", "über", "日本", "мир",
)


def sentences(n: int, seed: int = 0) -> list[str]:
    """n sentences whose lengths spread from 1 to ~150 words (most short, some long)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = max(1, min(150, int(rng.lognormvariate(2.8, 0.8))))
        out.append(" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + ".")
    return out


def timed(fns: dict, reps: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) of each function, the passes interleaved so
    that both sides see the same load on a shared machine."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 sentences, one timed pass")
    parser.add_argument("--n", type=int, default=None, help="number of sentences (default 512)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", default="auto", help="qkv.attention backend")
    args = parser.parse_args()
    n = args.n or (128 if args.quick else 512)
    reps = 1 if args.quick else 3
    torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from qkv.interop.minilm import load_minilm, model_dir

    texts = sentences(n)
    ours = load_minilm(device="cpu")
    theirs = SentenceTransformer(str(model_dir()), device="cpu")
    lengths = [len(ids) for ids in ours.tokenize(texts)]

    def run_qkv():
        return ours.encode(texts, batch_size=args.batch_size, backend=args.backend)

    def run_st():
        with torch.inference_mode():
            return theirs.encode(texts, batch_size=args.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True)

    a, b = run_qkv(), run_st()  # warm-up
    diff = (a - b.float()).abs().max().item()
    t = timed({"st": run_st, "qkv": run_qkv}, reps)
    (t_st, cpu_st), (t_qkv, cpu_qkv) = t["st"], t["qkv"]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{n} sentences, tokens per sentence {min(lengths)}..{max(lengths)} "
          f"(mean {statistics.mean(lengths):.0f}), batch {args.batch_size}, "
          f"median of {reps} pass(es)")
    print(f"sentence-transformers: {n / t_st:8.1f} sentences/s  ({cpu_st:.2f} CPU s)")
    print(f"qkv.embed ({args.backend}): {n / t_qkv:8.1f} sentences/s  ({cpu_qkv:.2f} CPU s)")
    print(f"ratio qkv / sentence-transformers: {t_st / t_qkv:.2f}x wall, "
          f"{cpu_st / cpu_qkv:.2f}x CPU time")
    print(f"max abs difference between the embeddings: {diff:.2e}")


if __name__ == "__main__":
    main()
