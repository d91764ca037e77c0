"""GPU attention sweep: qkv's triton backend beside torch SDPA's flash, cuDNN and efficient
kernels, in one process (FlashAttention's sweep, decode bandwidth, and the targets).

    PYTHONPATH=. python3 benchmarks/attention_gpu.py --out OUT [--quick] [--n N ...] [--reps R]
        [--provider P ...]

The same sweep as `qkv bench --device cuda` (qkv/bench/gpu.py), with argparse instead of the
CLI, so that it runs where only torch, triton, numpy and pytest are installed (the reference GPU
machine). The PNG is skipped without matplotlib.
"""

from __future__ import annotations

import argparse
import sys

from qkv.bench import GPU_PROVIDERS, GPU_REPS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for attention_gpu.json, .md and .png")
    ap.add_argument("--quick", action="store_true", help="two sequence lengths, two caches")
    ap.add_argument("--n", type=int, action="append", help="sequence length (repeatable)")
    ap.add_argument("--reps", type=int, default=GPU_REPS, help="do_bench medians per point")
    ap.add_argument("--provider", action="append", choices=GPU_PROVIDERS,
                    help="provider (repeatable; default all)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: attention_gpu.py needs CUDA, and this machine has none", file=sys.stderr)
        return 1
    from qkv.bench import gpu

    if args.out:
        from pathlib import Path

        Path(args.out).mkdir(parents=True, exist_ok=True)
    results = gpu.run_gpu_sweep(args.out, quick=args.quick, seqlens=args.n,
                                providers=args.provider, reps=args.reps)
    print(gpu.markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
