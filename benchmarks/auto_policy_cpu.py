"""The measurements behind `auto`'s CPU policy: sdpa, chunked and reference on masked calls.

torch SDPA needs an explicit (Lq x Lk) mask for anything but plain or square-causal attention;
chunked skips masked blocks and never builds the mask. This prints the time of each backend on
the kinds of call the library makes (decode over a cache, padded batches, long masked
sequences), which set `CPU_SDPA_MASKED_MAX_SCORES` in qkv/attention/sdpa.py.

    python benchmarks/auto_policy_cpu.py
"""

from __future__ import annotations

import time

import torch

import qkv

CASES = {
    "decode Lq=1 Lk=8200 causal": (dict(B=1, H=4, Lq=1, Lk=8200, D=64), dict(causal=True)),
    "decode Lq=1 Lk=512 causal, B=8": (dict(B=8, H=8, Lq=1, Lk=512, D=64), dict(causal=True)),
    "padded B=32 L=64 kv_lengths": (dict(B=32, H=12, Lq=64, Lk=64, D=32), "kv"),
    "padded B=32 L=128 kv_lengths": (dict(B=32, H=12, Lq=128, Lk=128, D=32), "kv"),
    "L=512 causal + kv_lengths, B=4": (dict(B=4, H=8, Lq=512, Lk=512, D=64), "causal_kv"),
    "L=2048 causal + kv_lengths, B=2": (dict(B=2, H=8, Lq=2048, Lk=2048, D=64), "causal_kv"),
    "L=2048 window (256, 0), B=1": (dict(B=1, H=8, Lq=2048, Lk=2048, D=64),
                                    dict(window=(256, 0))),
    "Lq=128 Lk=256 causal, B=4": (dict(B=4, H=8, Lq=128, Lk=256, D=64), dict(causal=True)),
}


def _keywords(spec, s) -> dict:
    gen = torch.Generator().manual_seed(0)
    if spec == "kv":
        return dict(kv_lengths=torch.randint(s["Lk"] // 8, s["Lk"] + 1, (s["B"],), generator=gen))
    if spec == "causal_kv":
        return dict(causal=True,
                    kv_lengths=torch.randint(s["Lk"] // 2, s["Lk"] + 1, (s["B"],), generator=gen))
    return spec


def _time(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    backends = ("sdpa", "chunked", "reference", "auto")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of 5, ms")
    print("| call | " + " | ".join(backends) + " |")
    print("|---|" + "---:|" * len(backends))
    with torch.no_grad():
        for name, (s, spec) in CASES.items():
            q = torch.randn(s["B"], s["H"], s["Lq"], s["D"])
            k = torch.randn(s["B"], s["H"], s["Lk"], s["D"])
            v = torch.randn_like(k)
            kw = _keywords(spec, s)
            ms = [_time(lambda b=b, q=q, k=k, v=v, kw=kw: qkv.attention(q, k, v, backend=b, **kw))
                  * 1e3
                  for b in backends]
            print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
