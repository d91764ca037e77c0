"""Peak memory per process of context-parallel attention against sequence length, on the CPU.

One causal attention forward and backward over a sequence of L tokens (B=1, 4 heads, head dim
64, float32), in world sizes 1, 2 and 4: world 1 is qkv.attention on the whole sequence; worlds
2 and 4 are qkv.distributed.context_parallel_attention (the ring) in that many gloo processes,
each holding a zigzag shard of L/N tokens. Every block uses the chunked backend, so what
differs is only how the sequence is split. Each world runs in fresh processes (one thread
each); before each length the resident high-water mark is reset (qkv.bench.memory), and the
figure is the peak resident size during forward + backward less the resident size before the
inputs were made, the largest over the ranks. "shard tensors" is what the shard's own q, k, v,
out, dout and the three gradients hold (8 × L/N × 4 heads × 64 × 4 bytes).

    python benchmarks/context_parallel_cpu.py                  # the table for RESULTS.md
    python benchmarks/context_parallel_cpu.py --lengths 1024   # seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qkv
from qkv.bench.cpu import machine_description
from qkv.bench.memory import peak_resident_bytes, reset_peak, resident_bytes, return_freed_memory
from qkv.distributed import context_parallel_attention

HEADS, HEAD_DIM = 4, 64
MIB = 2**20


def _one(rank: int, world_size: int, length: int) -> dict:
    """Forward + backward of one causal attention over this rank's shard; its memory figures."""
    gc.collect()
    base = resident_bytes()
    reset_done = reset_peak()
    g = torch.Generator().manual_seed(rank)
    shape = (1, HEADS, length // world_size, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))
    if world_size == 1:
        out = qkv.attention(q, k, v, causal=True, backend="chunked")
    else:
        out = context_parallel_attention(q, k, v, causal=True, backend="chunked")
    out.backward(torch.randn(out.shape, generator=g))
    peak = peak_resident_bytes() - base
    shard = 8 * q.numel() * q.element_size()
    del q, k, v, out
    return {"peak": peak, "shard": shard, "reset": reset_done}


def _worker(rank: int, world_size: int, lengths: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)
    return_freed_memory()
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                                world_size=world_size)
    _one(rank, world_size, lengths[0])  # warm-up: first-call allocations are not the work's
    rows = {}
    for length in lengths:
        if world_size > 1:
            dist.barrier()
        rows[length] = _one(rank, world_size, length)
    if world_size > 1:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))


def measure(world_size: int, lengths: list[int]) -> dict[int, dict]:
    """{length: {"peak": largest over the ranks, "shard": bytes, "reset": bool}}."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, lengths, out_dir), nprocs=world_size, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text())
                 for r in range(world_size)]
    return {length: {"peak": max(r[str(length)]["peak"] for r in ranks),
                     "shard": ranks[0][str(length)]["shard"],
                     "reset": all(r[str(length)]["reset"] for r in ranks)}
            for length in lengths}


def table(results: dict[int, dict[int, dict]], lengths: list[int]) -> str:
    worlds = sorted(results)
    head = "| L | " + " | ".join(f"world {w}: peak MiB / rank (shard tensors)" for w in worlds)
    lines = [head + " |", "|" + "---|" * (len(worlds) + 1)]
    for length in lengths:
        cells = [f"{results[w][length]['peak'] / MIB:.1f} ({results[w][length]['shard'] / MIB:.1f})"
                 for w in worlds]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    for length in args.lengths:
        for world in args.worlds:
            if length % (2 * world):
                parser.error(f"--lengths {length} must be divisible by 2 × world size {world}")
    results = {w: measure(w, args.lengths) for w in args.worlds}
    torch.set_num_threads(1)  # as in every measuring process, so the machine line says so
    print(f"command: python {shlex.join(['benchmarks/context_parallel_cpu.py', *sys.argv[1:]])}")
    print(f"machine: {machine_description()} per process; {os.cpu_count()} CPUs shared by "
          f"all processes")
    print(f"workload: causal attention forward + backward, B=1, {HEADS} heads, head dim "
          f"{HEAD_DIM}, float32, chunked backend for every block; worlds > 1: ring over gloo, "
          f"zigzag shards")
    if not all(r["reset"] for res in results.values() for r in res.values()):
        print("note: the high-water mark could not be reset here; peaks include earlier work")
    print()
    print(table(results, args.lengths))


if __name__ == "__main__":
    main()
