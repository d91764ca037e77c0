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
from qkv.distributed import ContextParallelLM, context_parallel_attention
from qkv.nn import DecoderLM, TransformerConfig

HEADS, HEAD_DIM = 4, 64
MODEL = {"d_model": 128, "n_layers": 2, "n_heads": 4, "positions": "rope"}
MIB = 2**20


def _attention(rank: int, world_size: int, length: int) -> int:
    """Forward + backward of one causal attention over this rank's shard; the bytes its own
    tensors hold."""
    g = torch.Generator().manual_seed(rank)
    shape = (1, HEADS, length // world_size, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))
    if world_size == 1:
        out = qkv.attention(q, k, v, causal=True, backend="chunked")
    else:
        out = context_parallel_attention(q, k, v, causal=True, backend="chunked")
    out.backward(torch.randn(out.shape, generator=g))
    return 8 * q.numel() * q.element_size()


def _model(length: int) -> DecoderLM:
    torch.manual_seed(0)  # the same weights on every rank
    return DecoderLM(TransformerConfig(vocab_size=256, max_len=length, backend="chunked",
                                       **MODEL))


def _training_step(model: DecoderLM, world_size: int, length: int) -> int:
    """Forward + backward of the model's loss on one sequence (this rank's shard of it)."""
    g = torch.Generator().manual_seed(1)  # the same sequence on every rank
    idx, targets = torch.randint(0, 256, (2, 1, length), generator=g)
    runner = model if world_size == 1 else ContextParallelLM(model, None)
    _, loss = runner(idx, targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return 0


def _one(rank: int, world_size: int, length: int, workload: str) -> dict:
    """The memory figures of one workload: peak above the resident size before it."""
    model = _model(length) if workload == "model" else None
    gc.collect()
    base = resident_bytes()
    reset_done = reset_peak()
    if model is None:
        shard = _attention(rank, world_size, length)
    else:
        shard = _training_step(model, world_size, length)
    return {"peak": peak_resident_bytes() - base, "shard": shard, "reset": reset_done}


def _worker(rank: int, world_size: int, lengths: list[int], workload: str,
            out_dir: str) -> None:
    torch.set_num_threads(1)
    return_freed_memory()
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                                world_size=world_size)
    _one(rank, world_size, lengths[0], workload)  # warm-up: first-call allocations
    rows = {}
    for length in lengths:
        if world_size > 1:
            dist.barrier()
        rows[length] = _one(rank, world_size, length, workload)
    if world_size > 1:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))


def measure(world_size: int, lengths: list[int], workload: str) -> dict[int, dict]:
    """{length: {"peak": largest over the ranks, "shard": bytes, "reset": bool}}."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, lengths, workload, out_dir), nprocs=world_size,
                 join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text())
                 for r in range(world_size)]
    return {length: {"peak": max(r[str(length)]["peak"] for r in ranks),
                     "shard": ranks[0][str(length)]["shard"],
                     "reset": all(r[str(length)]["reset"] for r in ranks)}
            for length in lengths}


def table(results: dict[int, dict[int, dict]], lengths: list[int], shards: bool) -> str:
    worlds = sorted(results)
    what = "peak MiB / rank (shard tensors)" if shards else "peak MiB / rank"
    lines = ["| L | " + " | ".join(f"world {w}: {what}" for w in worlds) + " |",
             "|" + "---|" * (len(worlds) + 1)]
    for length in lengths:
        cells = [f"{results[w][length]['peak'] / MIB:.1f}"
                 + (f" ({results[w][length]['shard'] / MIB:.1f})" if shards else "")
                 for w in worlds]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workloads", nargs="+", choices=["attention", "model"],
                        default=["attention", "model"])
    args = parser.parse_args(argv)
    for length in args.lengths:
        for world in args.worlds:
            if length % (2 * world):
                parser.error(f"--lengths {length} must be divisible by 2 × world size {world}")
    results = {workload: {w: measure(w, args.lengths, workload) for w in args.worlds}
               for workload in args.workloads}
    torch.set_num_threads(1)  # as in every measuring process, so the machine line says so
    print(f"command: python {shlex.join(['benchmarks/context_parallel_cpu.py', *sys.argv[1:]])}")
    print(f"machine: {machine_description()} per process; {os.cpu_count()} CPUs shared by "
          f"all processes")
    resets = [r["reset"] for by_world in results.values() for res in by_world.values()
              for r in res.values()]
    if not all(resets):
        print("note: the high-water mark could not be reset here; peaks include earlier work")
    if "attention" in results:
        print(f"\nattention: causal forward + backward, B=1, {HEADS} heads, head dim "
              f"{HEAD_DIM}, float32, chunked backend for every block; worlds > 1: ring over "
              f"gloo, zigzag shards\n")
        print(table(results["attention"], args.lengths, shards=True))
    if "model" in results:
        print(f"\nmodel: one training step (forward + backward of the loss) of a DecoderLM "
              f"({MODEL}, vocab 256, float32, chunked backend) on one sequence of L tokens; "
              f"worlds > 1: qkv.distributed.ContextParallelLM\n")
        print(table(results["model"], args.lengths, shards=False))


if __name__ == "__main__":
    main()
