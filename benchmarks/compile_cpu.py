"""torch.compile on the CPU: training-step tokens/s of the demo model, compiled against eager.

    python benchmarks/compile_cpu.py             # the demo model (qkv demo's), the RESULTS table
    python benchmarks/compile_cpu.py --quick     # the tests' small demo model, seconds

The model is `qkv demo`'s DecoderLM (qkv/train/demo.py: d_model 128, 4 layers, 4 heads, vocab
2048, batch 16 x 128 tokens) on random tokens. One training step is forward, loss, backward,
gradient clipping at 1.0 and an AdamW step, as `qkv train` does it. The compiled side is
`torch.compile(model, fullgraph=True)` (inductor; the optimizer stays eager on both sides);
both start from the same weights. After the compile and `--warmup` steps each, the timed steps
alternate between the two models so that both see the same load; the table gives the median.

A second table is the per-call cost of `qkv.attention` eagerly (direct to the backend) against
the same call through the custom op (`qkv.attention.op.attention_op`), which is why eager calls
skip the op (qkv/attention/op.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import qkv
from qkv.attention.op import attention_op
from qkv.attention.spec import check_call
from qkv.bench.cpu import machine_description
from qkv.nn import DecoderLM
from qkv.train.demo import demo_config
from qkv.train.loop import make_optimizer


def _setup(quick: bool):
    config = demo_config(quick=quick)
    torch.manual_seed(0)
    model = DecoderLM(config.model_config(config.vocab_size))
    shape = (config.batch_size, config.seq_len)
    idx = torch.randint(0, config.vocab_size, shape)
    targets = torch.randint(0, config.vocab_size, shape)
    return config, model, idx, targets


def _stepper(model, config, idx, targets, compiled: bool):
    """A function running one training step; returns (seconds, loss)."""
    model = copy.deepcopy(model)
    optimizer = make_optimizer(model, config)
    forward = torch.compile(model, fullgraph=True) if compiled else model

    def step():
        start = time.perf_counter()
        _, loss = forward(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(loss.detach())

    return step


def training_table(quick: bool, steps: int, warmup: int) -> str:
    config, model, idx, targets = _setup(quick)
    tokens = idx.numel()
    eager = _stepper(model, config, idx, targets, compiled=False)
    compiled = _stepper(model, config, idx, targets, compiled=True)
    first_eager, loss_eager = eager()
    compile_s, loss_compiled = compiled()  # the first call compiles
    for _ in range(warmup):
        eager(), compiled()
    times = {"eager": [], "compiled": []}
    for _ in range(steps):
        times["eager"].append(eager()[0])
        times["compiled"].append(compiled()[0])
    med = {name: statistics.median(ts) for name, ts in times.items()}
    lines = [
        f"model: DecoderLM d_model={config.model['d_model']} n_layers="
        f"{config.model['n_layers']} n_heads={config.model['n_heads']} vocab="
        f"{config.vocab_size}, batch {config.batch_size} x {config.seq_len} tokens, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; "
        f"median of {steps} steps after {warmup} warm-up steps",
        f"first step: eager {first_eager:.2f} s, compiled {compile_s:.1f} s (compiling); "
        f"loss of the first step: eager {loss_eager:.6f}, compiled {loss_compiled:.6f}",
        "",
        "| training step | median ms | tokens/s | vs eager |",
        "|---|---:|---:|---:|",
    ]
    for name in ("eager", "compiled"):
        lines.append(f"| {name} | {med[name] * 1e3:.1f} | {tokens / med[name]:,.0f} | "
                     f"{med['eager'] / med[name]:.2f}x |")
    return "\n".join(lines)


def _per_call_us(fn, reps: int) -> float:
    for _ in range(reps // 10):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best * 1e6


def _calls(backend: str, grad: bool):
    """The same small call directly and through the op, each with its backward if `grad`."""
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=grad) for _ in range(3))

    def direct():
        out = qkv.attention(q, k, v, causal=True, backend=backend)
        if grad:
            out.sum().backward()

    def via_op():
        out, _ = attention_op(q, k, v, check_call(q, k, v, causal=True), backend)
        if grad:
            out.sum().backward()

    return direct, via_op


def overhead_table(quick: bool) -> str:
    reps = 200 if quick else 2000
    lines = ["| call (B=1, H=2, L=16, D=16, causal, float32) | direct us | through the op us | "
             "op / direct |", "|---|---:|---:|---:|"]
    for backend, grad in (("sdpa", False), ("chunked", False), ("sdpa", True)):
        direct, via_op = _calls(backend, grad)
        a, b = _per_call_us(direct, reps), _per_call_us(via_op, reps)
        name = f"{backend}, {'forward + backward' if grad else 'forward'}"
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small demo model, few steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 15)
    command = "python benchmarks/compile_cpu.py" + (" --quick" if args.quick else "") + \
        f" --threads {args.threads}"
    print(f"command: {command}")
    print(f"machine: {machine_description()}")
    print()
    print(training_table(args.quick, steps, args.warmup))
    print()
    print(overhead_table(args.quick))


if __name__ == "__main__":
    main()
