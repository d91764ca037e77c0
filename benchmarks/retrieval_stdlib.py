"""Retrieval over the standard library: qkv's dense index beside BM25 and a random baseline,
and what a reader attends with retrieval against the whole module.

    python benchmarks/retrieval_stdlib.py --threads 2 --json runs/retrieval_stdlib.json
    python benchmarks/retrieval_stdlib.py --quick     # the 3 smallest modules, a smoke run

The benchmark (qkv.retrieval.stdlib): every module of this Python's standard library with at
least --min-lines lines (test suites and generated files left out), its docstrings and comments
stripped; one query per documented function, method or class, the first sentence of its
docstring; the answer is any passage holding its `def`/`class` line. The stripped modules are
indexed with qkv.retrieval.index_texts at its defaults (all-MiniLM-L6-v2 on qkv's encoder, 200-
token passages, 32 tokens of overlap) and each query ranks the passages three ways: dense
(Index.rank, exact cosine), BM25 (bm25s over code-aware tokens of the same passages) and random
(seeded). Reported: recall@1/5/10 and MRR over the top 100, overall and by kind.

The cost side: per module, its whole original text in MiniLM WordPiece tokens against the tokens
of the top-5 dense passages a reader would attend instead (their own lengths, averaged over the
module's queries); and `qkv plan` (qkv.plan.make_plan) for a reader, llama-1b (shapes only),
one prefill pass in bf16 at batch 1, attending the median and the largest module whole or its
retrieved passages: peak memory and time per CPU backend, the rates measured here once.
Tables print as markdown; --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

K_READER = 5  # passages the reader attends
KS = (1, 5, 10)
QUICK_MODULES = 3
READER = {"model": "llama-1b", "dtype": "bf16", "mode": "prefill", "batch": 1}
METHODS = ("dense (qkv MiniLM)", "BM25 (bm25s)", "random (seed 0)")


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats as 3 decimals."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def seconds(s: float) -> str:
    return f"{s:,.2f} s" if s < 600 else f"{s / 60:,.1f} min" if s < 36000 else f"{s / 3600:,.1f} h"


def progress_printer(label: str):
    """A progress(done, total) that writes a line to stderr at each tenth."""
    start, shown = time.perf_counter(), [-1]

    def report(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth != shown[0]:
            shown[0] = tenth
            print(f"{label}: {done}/{total} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    return report


def score(rankings, rel, targets, keep) -> dict:
    """Metrics over the kept targets, overall and per kind."""
    from qkv.retrieval.stdlib import metrics

    out = {"all": metrics([rankings[i] for i in keep], [rel[i] for i in keep], KS)}
    for kind in ("function", "class"):
        mine = [i for i in keep if targets[i].kind == kind]
        if mine:
            out[kind] = metrics([rankings[i] for i in mine], [rel[i] for i in mine], KS)
    return out


def rank_all(index, bench, depth: int, times: dict) -> dict[str, list[list[int]]]:
    """Each method's top-`depth` passage indices per target, timed into `times`."""
    from qkv.retrieval.stdlib import bm25_rankings, random_rankings

    queries = [t.query for t in bench.targets]
    start = time.perf_counter()
    _, ids = index.rank(queries, k=depth)
    times["query_dense_s"] = time.perf_counter() - start
    start = time.perf_counter()
    bm25 = bm25_rankings(index.passages, queries, depth)
    times["bm25_index_and_query_s"] = time.perf_counter() - start
    start = time.perf_counter()
    rand = random_rankings(len(index.passages), len(queries), depth, seed=0)
    times["random_s"] = time.perf_counter() - start
    return dict(zip(METHODS, (ids.tolist(), bm25, rand), strict=True))


def reader_cost(bench, index, dense: list[list[int]], times: dict) -> dict:
    """Tokens per module with and without retrieval, and the reader's plans."""
    from qkv.plan import load_model, rates_for
    from qkv.retrieval.stdlib import reader_plans, retrieval_cost

    rows = retrieval_cost(bench, index.passages, dense, K_READER)
    by_size = sorted((r for r in rows if r["retrieved_tokens"]), key=lambda r: r["tokens"])
    median, largest = by_size[(len(by_size) - 1) // 2], by_size[-1]
    lengths = {f"median module whole ({median['name']})": median["tokens"],
               f"largest module whole ({largest['name']})": largest["tokens"],
               f"{K_READER} passages (median module)": round(median["retrieved_tokens"]),
               f"{K_READER} passages (largest module)": round(largest["retrieved_tokens"])}
    start = time.perf_counter()
    n = max(lengths.values())
    rates = rates_for(load_model(READER["model"], n), n, READER["batch"], READER["mode"],
                      READER["dtype"], torch.device("cpu"), bench=None, measure=True)
    plans = reader_plans(lengths, READER["model"], READER["dtype"], rates)
    times["plan_s"] = time.perf_counter() - start
    measured = {"source": rates.source, "matmul_flops": rates.matmul,
                "attention_flops": {b: r["fwd"] for b, r in rates.attention.items()}}
    return {"modules": rows, "median": median["name"], "largest": largest["name"],
            "plans": plans, "reader": READER, "k": K_READER, "rates": measured}


def report(result: dict) -> str:
    """The markdown tables."""
    s, t, cost = result["setup"], result["times"], result["cost"]
    out = ["## Retrieval over the standard library", "",
           table(["Python", "modules", "passages", "targets", "functions", "classes",
                  "skipped (query < 3 words)", "without a relevant passage"],
                 [[s["python"], s["modules"], s["passages"], s["targets"], s["functions"],
                   s["classes"], s["skipped_short"], s["no_relevant"]]]), "",
           f"Passages: max_tokens {s['max_tokens']}, overlap {s['overlap']}; mean "
           f"{s['passage_tokens_mean']:.0f} tokens. MRR over the top {s['mrr_cutoff']}.", ""]
    header = ["method", "recall@1", "recall@5", "recall@10", f"MRR@{s['mrr_cutoff']}"]
    out += [table(header, [[m, *(r["all"][f"recall@{k}"] for k in KS), r["all"]["mrr"]]
                           for m, r in result["metrics"].items()]), "", "By kind:", ""]
    rows = [[m, kind, r[kind]["queries"], *(r[kind][f"recall@{k}"] for k in KS), r[kind]["mrr"]]
            for kind in ("function", "class") for m, r in result["metrics"].items() if kind in r]
    out += [table(["method", "kind", "queries", *header[1:]], rows), ""]
    mods = {r["name"]: r for r in cost["modules"]}
    with_q = [r for r in cost["modules"] if r["retrieved_tokens"]]
    mean_whole = sum(r["tokens"] for r in with_q) / len(with_q)
    mean_ret = sum(r["retrieved_tokens"] for r in with_q) / len(with_q)
    rows = [[f"{label} ({r['name']})", r["lines"], r["tokens"], round(r["retrieved_tokens"]),
             f"{r['ratio']:.0f}x"] for label, r in (("median", mods[cost["median"]]),
                                                    ("largest", mods[cost["largest"]]))]
    rows.append([f"mean over {len(with_q)} modules", "", round(mean_whole), round(mean_ret),
                 f"{mean_whole / mean_ret:.0f}x"])
    out += ["## What the reader attends", "",
            table(["module", "lines", "tokens, whole module",
                   f"tokens, top {cost['k']} passages (mean per query)", "whole / retrieved"],
                  rows), ""]
    backends = list(next(iter(cost["plans"].values()))["backends"])
    r = cost["reader"]
    rows = [[label, f"{p['seq_len']:,}",
             *(gib(p["backends"][b]["peak_bytes"]) for b in backends),
             *(seconds(p["backends"][b]["seconds"]) for b in backends)]
            for label, p in cost["plans"].items()]
    rates = ", ".join(f"{b} {v / 1e9:.1f}" for b, v in cost["rates"]["attention_flops"].items())
    out += [f"qkv plan: {r['model']}, {r['mode']}, {r['dtype']}, batch {r['batch']}, on this "
            f"CPU; times from a {cost['rates']['source']} (attention GFLOP/s: {rates}; matmul "
            f"{cost['rates']['matmul_flops'] / 1e9:.0f}).", "",
            table(["reader attends", "tokens", *(f"peak memory, {b}" for b in backends),
                   *(f"time, {b}" for b in backends)], rows), ""]
    rows = [["build the benchmark", seconds(t["build_s"])],
            ["embed the passages", f"{seconds(t['embed_s'])} ({s['passages'] / t['embed_s']:.1f} "
                                   f"passages/s, {s['torch_threads']} threads)"],
            ["dense: embed queries and rank", seconds(t["query_dense_s"])],
            ["BM25: index and query", seconds(t["bm25_index_and_query_s"])],
            ["random", seconds(t["random_s"])], ["qkv plan (with its calibration)",
                                                 seconds(t["plan_s"])],
            ["total", seconds(t["total_s"])]]
    return "\n".join(out + ["## Wall times", "", table(["step", "time"], rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only the {QUICK_MODULES} smallest modules (a smoke run)")
    parser.add_argument("--min-lines", type=int, default=1000, help="smallest module, in lines")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import platform

    from qkv.retrieval import index_texts
    from qkv.retrieval.stdlib import MRR_CUTOFF, build_benchmark, relevant_sets, stdlib_modules

    times: dict[str, float] = {}
    start = time.perf_counter()
    paths = stdlib_modules(args.min_lines)
    if args.quick:
        paths = sorted(sorted(paths, key=lambda p: p.stat().st_size)[:QUICK_MODULES])
    bench = build_benchmark(args.min_lines, modules=paths)
    times["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    index = index_texts(bench.documents, progress=progress_printer("embedding passages"))
    times["embed_s"] = time.perf_counter() - start
    rel = relevant_sets(index.passages, bench.targets)
    keep = [i for i, r in enumerate(rel) if r]
    ranked = rank_all(index, bench, MRR_CUTOFF, times)
    result_metrics = {m: score(r, rel, bench.targets, keep) for m, r in ranked.items()}
    cost = reader_cost(bench, index, ranked[METHODS[0]], times)
    times["total_s"] = sum(times.values())
    from qkv.retrieval.stdlib import count_tokens

    lengths = count_tokens([p.embed_text for p in index.passages])
    kinds = [bench.targets[i].kind for i in keep]
    setup = {"python": bench.python, "platform": platform.platform(), "quick": args.quick,
             "min_lines": args.min_lines, "modules": len(bench.documents),
             "passages": len(index.passages), "targets": len(keep),
             "functions": kinds.count("function"), "classes": kinds.count("class"),
             "skipped_short": bench.skipped["short_query"], "unreadable":
             bench.skipped["unreadable"], "no_relevant": len(rel) - len(keep),
             "max_tokens": index.settings["max_tokens"], "overlap": index.settings["overlap"],
             "passage_tokens_mean": sum(lengths) / len(lengths), "mrr_cutoff": MRR_CUTOFF,
             "torch_threads": args.threads, "model": index.model}
    result = {"setup": setup, "metrics": result_metrics, "cost": cost, "times": times}
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
