"""all-MiniLM-L6-v2 throughput on this CPU: qkv's encoder beside ONNX Runtime and
sentence-transformers, on the same token ids, batches and threads.

    python benchmarks/encoder_onnx_cpu.py --threads 1
    python benchmarks/encoder_onnx_cpu.py --threads 2 --json out.json
    python benchmarks/encoder_onnx_cpu.py --quick          # small samples, one timed pass

Runners (all in this process, each given the same token ids in the same length-sorted batches
of 32, torch and ONNX Runtime both held to `--threads`):
- qkv: `SentenceEncoder.encode_ids`, packed (no padding), the default path of `qkv.embed` and of
  indexing;
- ORT: the same weights (transformers' BertModel, eager attention, with mean pooling over the
  attention mask and L2 normalisation) exported with `torch.onnx.export(..., dynamo=True)` and
  dynamic batch and length axes, run by ONNX Runtime's CPUExecutionProvider with
  intra_op threads = `--threads`, inter_op 1 and the default graph optimisation;
- ORT + optimizer: that graph after `onnxruntime.transformers.optimizer.optimize_model(
  model_type="bert")`, when the optimizer accepts it (on the dynamo graph it finds only the
  bias+GELU fusion, which ONNX Runtime's own default optimisation also makes, and no attention
  fusion);
- ORT, sdpa export: the same model exported with transformers' sdpa attention at opset 23,
  which becomes ONNX's fused `Attention` operator (the fairest ORT graph found here);
- sentence-transformers: the SentenceTransformer from the same folder, its modules called on
  the padded batches (so its tokenizer and its own sorting are left out, as for the others).

Workloads: (a) passages, a fixed sample of real passages that `qkv.retrieval.passages.split_text`
cuts from the largest standard-library modules (those of 1,000 lines or more, the first by
name) at the default budget of 200 tokens; (b) queries, a fixed sample of the first lines of
their docstrings. Every runner encodes one batch (the longest) to warm up; the timed passes are
then interleaved across runners (so all see the same load on a shared machine) and the medians
of wall and process CPU seconds are reported, with texts/s and real tokens/s (wall), the ratio
of qkv's speed to each runner's in wall and in CPU time (CPU time is the steadier of the two on
a busy machine; ONNX Runtime's worker threads spin while they wait, which counts as CPU time),
and the largest absolute difference of its vectors from those of qkv's first pass.

With 2 threads on a machine whose cores are busy with other work, torch's OpenMP threads (qkv
and sentence-transformers) lose far more than ONNX Runtime's own thread pool: a parallel region
waits for a descheduled thread. Record the load (uptime) with the figures, compare with
`--threads 1`, and try OMP_WAIT_POLICY=PASSIVE in the environment (the header names it).

The ONNX files are written under ~/.cache/qkv/onnx (keyed by the weights' sha256 and the torch
and onnxruntime versions), never into the repository.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

BATCH = 32
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qkv" / "onnx"


# --- the ONNX model -------------------------------------------------------------------------

class _Pooled(torch.nn.Module):
    """BertModel -> mean over the attention mask -> unit vectors, as sentence-transformers."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2.0, dim=-1)


def export_onnx(path: str | os.PathLike, folder: str | os.PathLike | None = None,
                attention: str = "eager") -> Path:
    """Export all-MiniLM-L6-v2 (`folder`, default the shipped one) with mean pooling and L2
    normalisation to ONNX at `path`: inputs input_ids and attention_mask (int64, (batch,
    length), both axes dynamic), output `sentence_embedding` (batch, 384) float32. Uses the
    dynamo exporter; the legacy one (dynamo=False) gives vectors off by up to 0.1 here.

    attention="eager": transformers' matmul-softmax-matmul attention, at the exporter's default
    opset; "sdpa": scaled_dot_product_attention at opset 23, which becomes ONNX's fused
    `Attention` operator."""
    from transformers import BertModel

    from qkv.interop.minilm import model_dir

    if attention not in ("eager", "sdpa"):
        raise ValueError(f"attention must be 'eager' or 'sdpa', got {attention!r}")
    path = Path(path)
    bert = BertModel.from_pretrained(os.fspath(folder or model_dir()),
                                     attn_implementation=attention, add_pooling_layer=False)
    model = _Pooled(bert).eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    mask = (ids != 0).long()
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=512)
    tmp = path.with_name(path.name + ".part")
    torch.onnx.export(model, (ids, mask), os.fspath(tmp), dynamo=True,
                      opset_version=23 if attention == "sdpa" else None,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["sentence_embedding"],
                      dynamic_shapes={"input_ids": {0: batch, 1: length},
                                      "attention_mask": {0: batch, 1: length}},
                      external_data=False, verbose=False)
    os.replace(tmp, path)
    return path


def ort_session(path: str | os.PathLike, threads: int):
    """An ONNX Runtime CPU session: intra_op `threads`, inter_op 1, default optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (b, L) int64 ids (0 is [PAD]) and their attention mask."""
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(row)
    return ids, (ids != 0).long()


def ort_encode(session, ids: list[list[int]], batch_size: int = BATCH) -> torch.Tensor:
    """Unit vectors (N, dim) from an exported session, batches made as `encode_ids` makes them
    (sorted by length, consecutive groups of batch_size), returned in the input order."""
    return _by_batches(ids, batch_size, lambda i, m: torch.from_numpy(session.run(
        ["sentence_embedding"], {"input_ids": i.numpy(), "attention_mask": m.numpy()})[0]))


def _by_batches(ids, batch_size, run) -> torch.Tensor:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    parts = []
    for start in range(0, len(ids), batch_size):
        parts.append(run(*padded([ids[i] for i in order[start:start + batch_size]])))
    out = torch.empty(len(ids), parts[0].shape[1])
    out[torch.tensor(order)] = torch.cat(parts).float()
    return out


def cached_models(optimize: bool) -> dict[str, Path]:
    """The ONNX files to time, by row name: "ORT" (eager attention), "ORT + optimizer" (that
    graph through onnxruntime.transformers' BERT optimizer, when asked for and when it takes the
    graph) and "ORT, sdpa export" (ONNX Attention operator). Exported once per weights, torch
    and onnxruntime version, under CACHE."""
    import onnxruntime as ort

    from qkv.interop.minilm import MODEL_SHA256

    CACHE.mkdir(parents=True, exist_ok=True)
    stem = f"minilm-{MODEL_SHA256[:12]}-torch{torch.__version__}-ort{ort.__version__}"
    models = {}
    for name, attention in (("ORT", "eager"), ("ORT, sdpa export", "sdpa")):
        models[name] = CACHE / f"{stem}-{attention}.onnx"
        if not models[name].is_file():
            print(f"exporting to {models[name]} ...", file=sys.stderr)
            export_onnx(models[name], attention=attention)
    fused = CACHE / f"{stem}-eager-bert-opt.onnx"
    if optimize and not fused.is_file():
        try:
            from onnxruntime.transformers.optimizer import optimize_model

            opt = optimize_model(os.fspath(models["ORT"]), model_type="bert", num_heads=12,
                                 hidden_size=384)
            fusions = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
            print(f"ORT transformer optimizer fusions: {fusions}", file=sys.stderr)
            opt.save_model_to_file(os.fspath(fused) + ".part")
            os.replace(os.fspath(fused) + ".part", fused)
        except Exception as e:  # the optimizer's failures have no common type
            print(f"ORT transformer optimizer failed on the dynamo graph: {e!r}",
                  file=sys.stderr)
    if optimize and fused.is_file():
        models = {"ORT": models["ORT"], "ORT + optimizer": fused,
                  "ORT, sdpa export": models["ORT, sdpa export"]}
    return models


def session_ops(path: Path) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime runs after its own (default) optimisation."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


MAIN_OPS = ("MatMul", "FusedMatMul", "Softmax", "Attention", "SkipLayerNormalization",
            "LayerNormalization", "BiasGelu", "Gelu")


# --- the texts ------------------------------------------------------------------------------

def big_modules(n: int, min_lines: int = 1000) -> list[tuple[str, str]]:
    """The first n modules of the retrieval benchmark (`qkv.retrieval.stdlib.stdlib_modules`:
    standard-library modules of min_lines lines or more, by relative path), as (name, source)."""
    from qkv.retrieval.stdlib import stdlib_modules

    root = Path(sysconfig.get_paths()["stdlib"])
    return [(path.relative_to(root).as_posix(), path.read_text(encoding="utf-8"))
            for path in stdlib_modules(min_lines)[:n]]


SPLITTER = "qkv.retrieval.passages.split_text (200 tokens, overlap 32)"


def passages(n: int, modules: int = 12, seed: int = 0) -> list[str]:
    """A fixed sample of n passages (as embedded) from the first `modules` big stdlib modules."""
    from qkv.retrieval.passages import split_text

    texts = [p.embed_text for name, src in big_modules(modules)
             for p in split_text(src, "python", file=name)]
    rng = random.Random(seed)
    return [texts[i] for i in sorted(rng.sample(range(len(texts)), min(n, len(texts))))]


def queries(n: int, modules: int = 12, seed: int = 0) -> list[str]:
    """A fixed sample of n docstring first lines of functions and classes in the same modules."""
    out = []
    for _, src in big_modules(modules):
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    out.append(doc.strip().splitlines()[0])
    rng = random.Random(seed)
    return [out[i] for i in sorted(rng.sample(range(len(out)), min(n, len(out))))]


# --- timing ---------------------------------------------------------------------------------

def timed(fns: dict, reps: int) -> tuple[dict[str, list[tuple[float, float]]], dict]:
    """(wall, process CPU) seconds of each pass, passes interleaved across the functions, and
    each function's result from its first pass."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    results = {}
    for _ in range(reps):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            results.setdefault(name, out)
    return times, results


def runners(ours, threads: int, models: dict[str, Path]) -> dict:
    """name -> function of token id lists returning (N, dim) unit vectors in the input order,
    each making the same length-sorted batches of BATCH."""
    from sentence_transformers import SentenceTransformer

    from qkv.interop.minilm import model_dir

    st = SentenceTransformer(str(model_dir()), device="cpu")

    def st_batch(i, m):
        with torch.inference_mode():
            out = st({"input_ids": i, "attention_mask": m, "token_type_ids": torch.zeros_like(i)})
        return out["sentence_embedding"]

    fns = {"qkv (packed)": lambda ids: ours.encode_ids(ids, batch_size=BATCH)}
    for name, path in models.items():
        fns[name] = functools.partial(ort_encode, ort_session(path, threads))
    fns["sentence-transformers"] = lambda ids: _by_batches(ids, BATCH, st_batch)
    return fns


def workload(label: str, ours, texts: list[str], fns: dict, reps: int) -> dict:
    ids = ours.tokenize(texts)
    lengths = [len(r) for r in ids]
    longest = sorted(ids, key=len)[-BATCH:]
    for fn in fns.values():  # warm-up: one batch each
        fn(longest)
    times, vectors = timed({name: functools.partial(fn, ids) for name, fn in fns.items()}, reps)
    base = [statistics.median(t[k] for t in times["qkv (packed)"]) for k in (0, 1)]
    rows = []
    for name, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        rows.append({"runner": name, "wall_s": wall, "cpu_s": cpu,
                     "texts_per_s": len(ids) / wall, "tokens_per_s": sum(lengths) / wall,
                     "qkv_speedup": wall / base[0], "qkv_speedup_cpu": cpu / base[1],
                     "passes_wall_s": [t[0] for t in ts], "passes_cpu_s": [t[1] for t in ts],
                     "max_abs_diff_vs_qkv": (vectors[name] - vectors["qkv (packed)"]
                                             ).abs().max().item()})
    order = sorted(lengths)
    padded_tokens = sum(max(order[i:i + BATCH]) * len(order[i:i + BATCH])
                        for i in range(0, len(order), BATCH))
    return {"workload": label, "texts": len(ids), "tokens": sum(lengths),
            "padded_tokens": padded_tokens,
            "min_tokens": min(lengths), "max_tokens": max(lengths),
            "mean_tokens": statistics.mean(lengths), "reps": reps, "rows": rows}


def table(result: dict) -> str:
    head = (f"{result['workload']}: {result['texts']} texts, {result['tokens']} tokens "
            f"({result['min_tokens']}..{result['max_tokens']}, mean "
            f"{result['mean_tokens']:.0f}); batches of {BATCH} sorted by length, padded to "
            f"{result['padded_tokens']} tokens for ORT and sentence-transformers; median of "
            f"{result['reps']} pass(es)")
    lines = [head,
             "| runner | texts/s | tokens/s | wall s | CPU s | qkv speed / this (wall) | "
             "(CPU) | max abs diff vs qkv |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['runner']} | {r['texts_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['qkv_speedup']:.2f}x | "
                     f"{r['qkv_speedup_cpu']:.2f}x | {r['max_abs_diff_vs_qkv']:.1e} |")
    return "\n".join(lines)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="torch and ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="64 passages and 128 queries, one timed pass")
    parser.add_argument("--passages", type=int, default=None, help="default 512")
    parser.add_argument("--queries", type=int, default=None, help="default 512")
    parser.add_argument("--reps", type=int, default=None, help="timed passes (default 3)")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="skip the ORT transformer optimizer row")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.quick else 3)
    n_pass = args.passages or (64 if args.quick else 512)
    n_query = args.queries or (128 if args.quick else 512)
    import onnxruntime as ort

    print(f"machine: {machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}; {args.threads} thread(s); OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    from qkv.interop.minilm import load_minilm

    models = cached_models(not args.no_optimizer)
    graphs = {name: session_ops(path) for name, path in models.items()}
    for name, ops in graphs.items():
        print(f"{name}: graph run by ONNX Runtime has "
              + ", ".join(f"{ops[op]} {op}" for op in MAIN_OPS if ops.get(op)))
    ours = load_minilm(device="cpu")
    fns = runners(ours, args.threads, models)
    print(f"passages from the first 12 stdlib modules of >= 1000 lines by {SPLITTER}")
    results = []
    for label, texts in (("passages", passages(n_pass)),
                         ("queries", queries(n_query))):
        result = workload(label, ours, texts, fns, reps)
        print(table(result), flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "threads": args.threads, "splitter": SPLITTER,
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
             "graphs": graphs,
             "torch": torch.__version__,
             "onnxruntime": ort.__version__, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
