"""The chunked backend's two CPU paths beside torch SDPA, in one process: the fused pieces
(qkv/attention/pieces.py) and the Python blocks alone (the fused path switched off).

    python benchmarks/chunked_paths_cpu.py            # n = 4096, H = 8, d = 64, fp32
    python benchmarks/chunked_paths_cpu.py --n 1024
"""

from __future__ import annotations

import argparse

import torch
from auto_policy_cpu import best_time  # this folder

import qkv
from qkv.attention import pieces


def _run(q, k, v, backend: str, causal: bool, mode: str):
    if mode == "fwd":
        return lambda: qkv.attention(q, k, v, causal=causal, backend=backend)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    return lambda: qkv.attention(q, k, v, causal=causal, backend=backend).sum().backward()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, args.n, 64, generator=gen) for _ in range(3))
    usable = pieces.usable
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.reps}, s")
    print("| n | mode | causal | sdpa | chunked, fused | chunked, Python blocks "
          "| fused / sdpa | Python / sdpa |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    try:
        for causal in (False, True):
            for mode in ("fwd", "fwd_bwd"):
                times = []
                for backend, fused in (("sdpa", True), ("chunked", True), ("chunked", False)):
                    pieces.usable = usable if fused else (lambda call, q: False)
                    times.append(best_time(_run(q, k, v, backend, causal, mode), args.reps))
                print(f"| {args.n} | {mode} | {causal} | "
                      + " | ".join(f"{t:.3f}" for t in times)
                      + f" | {times[1] / times[0]:.2f}× | {times[2] / times[0]:.2f}× |",
                      flush=True)
    finally:
        pieces.usable = usable


if __name__ == "__main__":
    main()
