"""The measurements behind `auto`'s CPU policy: sdpa, chunked and reference on masked calls.

torch SDPA needs an explicit (Lq x Lk) mask for anything but plain or square-causal attention.
chunked cuts band-shaped visibility (causal, window, kv_lengths, offsets, ALiBi) into pieces of
torch's fused kernel and never builds the mask; a bias or a boolean mask it runs in Python
blocks. This prints the time of each backend on the kinds of call the library makes (decode over
a cache, padded batches, long masked sequences), which set `sdpa.prefers` (qkv/attention/sdpa.py).

    python benchmarks/auto_policy_cpu.py            # every case (about 6 minutes on 2 cores)
    python benchmarks/auto_policy_cpu.py --quick    # the small cases, for the tests
"""

from __future__ import annotations

import argparse
import time

import torch

import qkv

H, D = 8, 64
SLOPES = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)  # ALiBi's geometric slopes


def _small() -> dict:
    return {
        "decode Lq=1 Lk=8200 causal": (dict(B=1, H=4, Lq=1, Lk=8200, D=64), dict(causal=True)),
        "decode Lq=1 Lk=512 causal, B=8": (dict(B=8, H=8, Lq=1, Lk=512, D=64),
                                           dict(causal=True)),
        "decode Lq=1 Lk=2048 kv_lengths, B=8": (dict(B=8, H=8, Lq=1, Lk=2048, D=64), "kv"),
        "padded B=32 L=64 kv_lengths": (dict(B=32, H=12, Lq=64, Lk=64, D=32), "kv"),
        "padded B=32 L=128 kv_lengths": (dict(B=32, H=12, Lq=128, Lk=128, D=32), "kv"),
        "L=256 causal + kv_lengths, B=4": (dict(B=4, H=8, Lq=256, Lk=256, D=64), "causal_kv"),
        "L=512 causal + kv_lengths, B=4": (dict(B=4, H=8, Lq=512, Lk=512, D=64), "causal_kv"),
        "L=512 ALiBi causal, B=1": (dict(B=1, H=H, Lq=512, Lk=512, D=D),
                                    dict(causal=True, alibi_slopes=SLOPES)),
        "Lq=128 Lk=256 causal, B=4": (dict(B=4, H=8, Lq=128, Lk=256, D=64), dict(causal=True)),
    }


def _long(n: int) -> dict:
    s = dict(B=1, H=H, Lq=n, Lk=n, D=D)
    mask = torch.ones(n, n, dtype=torch.bool).tril_(0).triu_(-n // 2)
    return {
        f"L={n} window (256, 0)": (s, dict(window=(256, 0))),
        f"L={n} window ({n // 4}, {n // 4})": (s, dict(window=(n // 4, n // 4))),
        f"L={n} causal + kv_lengths, B=2": (dict(s, B=2), "causal_kv"),
        f"L={n} ALiBi causal": (s, dict(causal=True, alibi_slopes=SLOPES)),
        f"L={n} ALiBi": (s, dict(alibi_slopes=SLOPES)),
        f"L={n} bool mask (n, n)": (s, dict(mask=mask)),
        f"L={n} bias (1, H, n, n)": (s, dict(bias=torch.randn(1, H, n, n))),
    }


def _keywords(spec, s) -> dict:
    gen = torch.Generator().manual_seed(0)
    if spec == "kv":
        return dict(kv_lengths=torch.randint(s["Lk"] // 8, s["Lk"] + 1, (s["B"],), generator=gen))
    if spec == "causal_kv":
        return dict(causal=True,
                    kv_lengths=torch.randint(s["Lk"] // 2, s["Lk"] + 1, (s["B"],), generator=gen))
    return spec


def best_time(fn, reps: int) -> float:
    """Seconds of the fastest of `reps` calls of fn, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small cases only")
    parser.add_argument("--n", type=int, action="append", help="long-case lengths (repeatable)")
    args = parser.parse_args(argv)
    cases = _small()
    for n in [] if args.quick else args.n or [1024, 2048, 4096]:
        cases.update(_long(n))
    backends = ("sdpa", "chunked", "reference", "auto")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of 5 (3 from "
          "2048 x 2048 scores), ms; reference only up to 1024 x 1024")
    print("| call | " + " | ".join(backends) + " | chunked / sdpa | auto chose |")
    print("|---|" + "---:|" * len(backends) + "---:|---|")
    with torch.no_grad():
        for name, (s, spec) in cases.items():
            gen = torch.Generator().manual_seed(1)
            q = torch.randn(s["B"], s["H"], s["Lq"], s["D"], generator=gen)
            k = torch.randn(s["B"], s["H"], s["Lk"], s["D"], generator=gen)
            v = torch.randn(k.shape, generator=gen)
            kw = _keywords(spec, s)
            scores = s["Lq"] * s["Lk"]
            reps = 5 if scores < 2048 * 2048 else 3
            ms = {b: best_time(_call(q, k, v, b, kw), reps) * 1e3
                  for b in backends if b != "reference" or scores <= 1024 * 1024}
            chose = _chosen(q, k, v, kw)
            cells = [f"{ms[b]:.2f}" if b in ms else "–" for b in backends]
            print(f"| {name} | " + " | ".join(cells)
                  + f" | {ms['chunked'] / ms['sdpa']:.2f} | {chose} |", flush=True)


def _call(q, k, v, backend, kw):
    return lambda: qkv.attention(q, k, v, backend=backend, **kw)


def _chosen(q, k, v, kw) -> str:
    from qkv.attention import registry
    from qkv.attention.spec import check_call
    return registry.choose(check_call(q, k, v, **kw), q, "auto").name


if __name__ == "__main__":
    main()
