"""Row `explain`: attention weights are not explanations.

Two attention-pooled classifiers (importance.py) are trained on two tasks and their attention
weights are set against gradient x input and leave-one-out importance, as in Jain & Wallace
(2019), "Attention is not Explanation":

- planted: `qkv.data.tasks.planted_keyword`, where the tokens that decide the label are known;
- code: Python standard-library functions from the default corpus. The label says whether a
  function is a method (defined directly in a class, first argument `self`) or a module-level
  function; the input is the start of its body after the docstring, dedented, so neither the
  `def` line nor the indentation gives it away and the evidence (uses of `self`, `super()`, ...)
  is spread over the body. Tokens are a small byte-level BPE trained on the training split;
  train and test are split by file, so no file is in both.
"""

from __future__ import annotations

import ast
import textwrap
import time
from dataclasses import dataclass

import torch

from qkv.compare.core import Context, Row, RowResult, fit, markdown_table
from qkv.compare.importance import (
    BiLSTMClassifier,
    TransformerClassifier,
    attention_weights,
    gradient_input,
    kendall_pvalues,
    kendall_tau_b,
    leave_one_out,
    predict,
    shuffle_attention,
    tau_summary,
    top_k_recovery,
)
from qkv.data.corpus import split_of, stdlib_files
from qkv.data.tasks import planted_keyword
from qkv.data.tokenizer import train_bpe

CLAIM = ("Attention weights do not explain a prediction: they rank its tokens differently from "
         "gradient and leave-one-out importance (mean Kendall tau well below 1).")
ANCHOR = ("Jain & Wallace (2019), \"Attention is not Explanation\" (NAACL): Kendall tau between "
          "attention and gradient importance of about 0.1-0.4 for BiLSTM encoders, and outputs "
          "that often barely move when attention is permuted. Counterpoint: Wiegreffe & Pinter "
          "(2019), \"Attention is not not Explanation\" (EMNLP): such tests do not show that "
          "attention cannot serve as an explanation for a given model.")
ANCHOR_TAU = (0.1, 0.4)
CLAIM_TAU = 0.4  # the claim holds where every mean tau(attention, other measure) is at most this
STILL_TVD = 0.05  # below this median total variation the output "barely moves" when shuffled
MODELS = ("bilstm", "transformer")
MODEL_NAMES = {"bilstm": "BiLSTM + additive attention",
               "transformer": "Transformer + additive attention"}
MEASURES = ("attention", "gradient_input", "leave_one_out")
PAIRS = ("gradient_input", "leave_one_out")  # each set against attention
CODE_SPLIT = (0.8, 0.0, 0.2)  # train / (unused) / test fractions of the files
WEIGHTS = ("both models: the additive pooling head's weights alpha, one per token; the "
           "permutation test shuffles alpha within each example and leaves the encoder (for the "
           "Transformer, its self-attention) untouched")
CODE_TASK = ("stdlib functions: method (first argument self, in a module-level class) or "
             "module-level function, from the first tokens of the dedented body after the "
             "docstring; byte-level BPE trained on the training files; split by file")


@dataclass(frozen=True)
class Sizes:
    planted_train: int
    planted_test: int
    planted_len: int
    code_stride: int  # every code_stride-th stdlib file
    code_len: int  # tokens per body window
    code_vocab: int
    code_train: int  # at most, balanced
    code_test: int
    d_model: int
    n_layers: int
    n_heads: int
    steps: int
    batch: int
    lr: float
    shuffles: int


FULL = Sizes(planted_train=4000, planted_test=500, planted_len=64, code_stride=1, code_len=64,
             code_vocab=1024, code_train=4000, code_test=500, d_model=64, n_layers=2,
             n_heads=4, steps=400, batch=64, lr=3e-3, shuffles=100)
QUICK = Sizes(planted_train=512, planted_test=64, planted_len=24, code_stride=15, code_len=32,
              code_vocab=300, code_train=512, code_test=64, d_model=32, n_layers=1, n_heads=2,
              steps=60, batch=32, lr=1e-2, shuffles=20)


@dataclass(frozen=True)
class Task:
    train_x: torch.Tensor  # (N, L) int64
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    vocab_size: int
    neutral_id: int  # never in the data: the leave-one-out replacement
    planted: torch.Tensor | None  # (N_test, L) bool, where known


def planted_task(ctx: Context, sizes: Sizes) -> Task:
    """planted_keyword train/test (seeds offset 1 and 2); the neutral token is one extra id."""
    train = planted_keyword(sizes.planted_train, sizes.planted_len, seed=ctx.seed(1))
    test = planted_keyword(sizes.planted_test, sizes.planted_len, seed=ctx.seed(2))
    return Task(train.inputs, train.labels, test.inputs, test.labels, train.vocab_size + 1,
                train.vocab_size, test.planted)


def _body(node: ast.FunctionDef, lines: list[str]) -> str:
    """The function's body after its docstring, dedented ('' if nothing follows)."""
    body = node.body
    if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    if not body:
        return ""
    return textwrap.dedent("\n".join(lines[body[0].lineno - 1:node.end_lineno]))


def _takes_self(node) -> bool:
    args = node.args.posonlyargs + node.args.args
    return bool(args) and args[0].arg == "self"


def function_bodies(files: list) -> dict[str, list[tuple[str, int]]]:
    """{"train": [(body, label)], "test": [...]}: label 1 for methods (first argument `self`,
    defined directly in a module-level class), 0 for module-level functions not taking `self`.
    Files that do not parse are skipped; the split is by file name (CODE_SPLIT)."""
    found = {"train": [], "test": []}
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    for name, path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        split = split_of(name, CODE_SPLIT)
        for node in tree.body:
            if isinstance(node, kinds) and not _takes_self(node):
                found[split].append((_body(node, lines), 0))
            elif isinstance(node, ast.ClassDef):
                found[split] += [(_body(m, lines), 1) for m in node.body
                                 if isinstance(m, kinds) and _takes_self(m)]
    return found


def _balanced(rows: list, cap: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal numbers of each label (at most cap in all), in a seeded random order."""
    by_label = [[ids for ids, y in rows if y == label] for label in (0, 1)]
    each = min(cap // 2, *map(len, by_label))
    if each == 0:
        raise ValueError("the code task found no examples of one class; is the stdlib there?")
    picked = []
    for label, group in enumerate(by_label):
        picked += [(group[i], label) for i in torch.randperm(len(group), generator=g)[:each]]
    order = torch.randperm(len(picked), generator=g).tolist()
    return (torch.tensor([picked[i][0] for i in order]),
            torch.tensor([picked[i][1] for i in order]))


def code_task(ctx: Context, sizes: Sizes) -> Task:
    """Method-or-function windows of the stdlib (see the module docstring)."""
    bodies = function_bodies(stdlib_files()[::sizes.code_stride])
    tokenizer = train_bpe([text for text, _ in bodies["train"]], vocab_size=sizes.code_vocab)
    g = torch.Generator().manual_seed(ctx.seed(3))
    split = {}
    for name, cap in (("train", sizes.code_train), ("test", sizes.code_test)):
        encoded = tokenizer.encode_batch([text for text, _ in bodies[name]])
        rows = [(ids[:sizes.code_len], y) for ids, (_, y) in zip(encoded, bodies[name], strict=True)
                if len(ids) >= sizes.code_len]
        split[name] = _balanced(rows, cap, g)
    return Task(*split["train"], *split["test"], tokenizer.vocab_size, tokenizer.pad_id, None)


def _model(kind: str, task: Task, sizes: Sizes):
    if kind == "bilstm":
        return BiLSTMClassifier(task.vocab_size, 2, d_model=sizes.d_model,
                                neutral_id=task.neutral_id)
    return TransformerClassifier(task.vocab_size, 2, d_model=sizes.d_model,
                                 n_layers=sizes.n_layers, n_heads=sizes.n_heads,
                                 max_len=task.train_x.shape[1], neutral_id=task.neutral_id)


def study(ctx: Context, task_name: str, task: Task, kind: str, sizes: Sizes, offset: int) -> dict:
    """Train one model on one task and measure everything the row reports about it."""
    label = f"explain: {kind} on {task_name}"
    ctx.manual_seed(10 + offset)
    model = _model(kind, task, sizes)
    g = torch.Generator().manual_seed(ctx.seed(20 + offset))

    def sample(step):
        index = torch.randint(0, len(task.train_x), (sizes.batch,), generator=g)
        return task.train_x[index], task.train_y[index]

    start = time.perf_counter()
    losses = fit(model, sample, steps=sizes.steps, lr=sizes.lr,
                 progress=lambda s: ctx.progress(f"{label}: training", s, sizes.steps))
    trained = time.perf_counter()
    ctx.progress(f"{label}: importance")
    x = task.test_x
    measures = {"attention": attention_weights(model, x),
                "gradient_input": gradient_input(model, x),
                "leave_one_out": leave_one_out(model, x, task.neutral_id)}
    result = {"accuracy": (predict(model, x).argmax(-1) == task.test_y).double().mean().item(),
              "final_loss": sum(losses[-20:]) / len(losses[-20:]), "tau": {}, "tau_summary": {}}
    for pair in PAIRS:
        taus = kendall_tau_b(measures["attention"], measures[pair])
        result["tau"][pair] = [round(t, 5) for t in taus.tolist()]
        result["tau_summary"][pair] = tau_summary(
            taus, kendall_pvalues(measures["attention"], measures[pair]))
    ctx.progress(f"{label}: shuffling attention")
    shuffled = shuffle_attention(model, x, sizes.shuffles,
                                 generator=torch.Generator().manual_seed(ctx.seed(30 + offset)))
    per_example = shuffled["tvd"].median(1).values
    result["permutation"] = {
        "median_tvd": per_example.median().item(), "mean_tvd": shuffled["tvd"].mean().item(),
        "flipped": shuffled["flipped"].double().mean().item(),
        "median_max_attention": measures["attention"].max(1).values.median().item(),
        "per_example_median_tvd": [round(t, 5) for t in per_example.tolist()]}
    if task.planted is not None:
        result["recovery"] = {m: top_k_recovery(measures[m], task.planted).mean().item()
                              for m in MEASURES}
        result["recovery_chance"] = (task.planted.sum(1) / x.shape[1]).double().mean().item()
    result["seconds"] = {"train": trained - start, "measure": time.perf_counter() - trained}
    return result


MEASURE_NAMES = {"attention": "attention", "gradient_input": "gradient×input",
                 "leave_one_out": "leave-one-out"}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _recovery_verdict(rec: dict) -> str:
    better = [rec[m]["attention"] > max(rec[m]["gradient_input"], rec[m]["leave_one_out"])
              for m in MODELS]
    if all(better):
        return (": here attention finds the deciding tokens better than both other measures, so "
                "weak rank agreement does not make it uninformative (Wiegreffe & Pinter's point)")
    if not any(better):
        return ": attention is not the best guide to the deciding tokens for either model"
    return ": attention is the best guide to the deciding tokens for one model only"


def judge(results: dict) -> dict:
    """The row's three separate verdicts from the per-model results:

    - "claim": every mean tau between attention and another measure (gradient x input,
      leave-one-out), for every model and task, is at most CLAIM_TAU (a nan mean fails);
    - "anchor_range": the BiLSTM's mean tau(attention, gradient x input) lies in ANCHOR_TAU on
      every task, as Jain & Wallace found;
    - "permutation": the BiLSTM's median TVD under shuffled attention is below STILL_TVD on
      every task;
    and "above": the (task, model, measure) cells that fail the claim.
    """
    low, high = ANCHOR_TAU
    means = {(t, m, p): results[t][m]["tau_summary"][p]["mean"]
             for t in results for m in MODELS for p in PAIRS}
    above = [cell for cell, x in means.items() if not x <= CLAIM_TAU]
    return {"claim": not above, "above": above,
            "anchor_range": all(low <= means[t, "bilstm", "gradient_input"] <= high
                                for t in results),
            "permutation": all(results[t]["bilstm"]["permutation"]["median_tvd"] < STILL_TVD
                               for t in results)}


def _claim_text(results: dict, above: list) -> str:
    """The sentence on part (a): the largest mean tau, or the cells above CLAIM_TAU."""
    if above:
        return ("attention ranks tokens much like " + "; ".join(
            f"{MEASURE_NAMES[p]} for the {MODEL_NAMES[m]} on {t} (mean τ "
            f"{results[t][m]['tau_summary'][p]['mean']:.2f})" for t, m, p in above)
            + f", above {CLAIM_TAU}.")
    top = max(results[t][m]["tau_summary"][p]["mean"]
              for t in results for m in MODELS for p in PAIRS)
    return (f"attention ranks tokens differently from gradient×input and leave-one-out for both "
            f"models on both tasks (every mean τ ≤ {CLAIM_TAU}; the largest is {top:.2f}).")


def summarise(results: dict, data: dict) -> RowResult:
    """The row's tables, headline, findings and verdict from the per-model results."""
    cells = [(t, m, results[t][m]) for t in results for m in MODELS]
    tables = [
        markdown_table(["task", "model", "test accuracy", "training (s)"],
                       [[t, MODEL_NAMES[m], r["accuracy"], r["seconds"]["train"]]
                        for t, m, r in cells]),
        markdown_table(["task", "model", "attention vs", "mean τ", "median τ", "q25", "q75",
                        "p < 0.05"],
                       [[t, MODEL_NAMES[m], MEASURE_NAMES[p], *(r["tau_summary"][p][k] for k in
                         ("mean", "median", "q25", "q75", "significant"))]
                        for t, m, r in cells for p in PAIRS]),
        markdown_table(["task", "model", "median max attention", "median TVD when shuffled",
                        "mean TVD", "predictions flipped"],
                       [[t, MODEL_NAMES[m], *(r["permutation"][k] for k in (
                           "median_max_attention", "median_tvd", "mean_tvd", "flipped"))]
                        for t, m, r in cells])]
    planted = results["planted"]
    tables.append(markdown_table(
        ["model", *(f"top-k recovery: {MEASURE_NAMES[m]}" for m in MEASURES), "chance"],
        [[MODEL_NAMES[m], *(planted[m]["recovery"][k] for k in MEASURES),
          planted[m]["recovery_chance"]] for m in MODELS]))
    tau = {(t, m): results[t][m]["tau_summary"]["gradient_input"]["mean"] for t, m, _ in cells}
    perm = {(t, m): results[t][m]["permutation"] for t, m, _ in cells}
    lstm = [tau[t, "bilstm"] for t in results]
    low, high = ANCHOR_TAU
    verdicts = judge(results)  # (a), (b), (c) below
    holds, in_range, still = (verdicts[k] for k in ("claim", "anchor_range", "permutation"))
    rec = {m: planted[m]["recovery"] for m in MODELS}
    flips = {m: max(perm[t, m]["flipped"] for t in results) for m in MODELS}
    tvd = " / ".join(f"{perm[t, m]['median_tvd']:.2f}" for m in MODELS for t in results)
    findings = (
        f"(a) The claim {'holds' if holds else 'is NOT shown'}: "
        + _claim_text(results, verdicts["above"])
        + f" (b) Against the anchor: the BiLSTM's mean per-example Kendall τ between attention "
        f"and gradient×input is {tau['planted', 'bilstm']:.2f} (planted) and "
        f"{tau['code', 'bilstm']:.2f} (code), {'inside' if in_range else 'outside'} Jain & "
        f"Wallace's {low}–{high}"
        + (", below it: weaker agreement than theirs, which supports the claim" if max(lstm) < low
           else "")
        + f" (the Transformer's: {tau['planted', 'transformer']:.2f} and "
        f"{tau['code', 'transformer']:.2f}). (c) Permutation test: shuffling the attention "
        + ("barely moves the BiLSTM's output, as Jain & Wallace found" if still else
           "does move the BiLSTM's output, unlike Jain & Wallace's finding that it often barely "
           "does")
        + f" (median TVD {tvd} for BiLSTM planted / code, Transformer planted / code; up to "
        f"{_pct(flips['bilstm'])} and {_pct(flips['transformer'])} of predictions flip). On the "
        f"planted task attention puts the planted tokens in its top k "
        f"{_pct(rec['bilstm']['attention'])} / {_pct(rec['transformer']['attention'])} of the "
        f"time (BiLSTM / Transformer), gradient×input {_pct(rec['bilstm']['gradient_input'])} / "
        f"{_pct(rec['transformer']['gradient_input'])}, leave-one-out "
        f"{_pct(rec['bilstm']['leave_one_out'])} / {_pct(rec['transformer']['leave_one_out'])}"
        f" (chance {_pct(planted['bilstm']['recovery_chance'])}){_recovery_verdict(rec)}.")
    headline = (
        f"τ(attn, grad×input) BiLSTM {lstm[0]:.2f}/{lstm[1]:.2f}, Transformer "
        f"{tau['planted', 'transformer']:.2f}/{tau['code', 'transformer']:.2f} (planted/code; "
        f"anchor 0.1–0.4); shuffling flips ≤{_pct(flips['bilstm'])} (BiLSTM), "
        f"≤{_pct(flips['transformer'])} (Transformer); planted recovery by attention "
        f"{_pct(rec['bilstm']['attention'])}/{_pct(rec['transformer']['attention'])} vs chance "
        f"{_pct(planted['bilstm']['recovery_chance'])}")
    agrees = holds
    data["verdicts"] = {k: verdicts[k] for k in ("claim", "anchor_range", "permutation")}
    data["verdict"] = (
        f"agrees = (a), the claim: it holds when every mean tau between attention and "
        f"gradient x input or leave-one-out, for both models on both tasks, is at most "
        f"{CLAIM_TAU}; here it {'does' if holds else 'does not'}. Reported beside it, not part "
        f"of the verdict: (b) is the BiLSTM's mean tau(attention, gradient x input) in Jain & "
        f"Wallace's [{low}, {high}] on both tasks? {'yes' if in_range else 'no'}; (c) is the "
        f"BiLSTM's median TVD when its attention is shuffled below {STILL_TVD} on both tasks? "
        f"{'yes' if still else 'no'}.")
    return RowResult(claim=CLAIM, anchor=ANCHOR, findings=findings, agrees=agrees,
                     headline=headline, tables=tables, data=data)


def run(ctx: Context) -> RowResult:
    sizes = QUICK if ctx.quick else FULL
    start = time.perf_counter()
    ctx.progress("explain: building the tasks")
    tasks = {"planted": planted_task(ctx, sizes), "code": code_task(ctx, sizes)}
    results = {name: {} for name in tasks}
    for i, (task_name, task) in enumerate(tasks.items()):
        for j, kind in enumerate(MODELS):
            results[task_name][kind] = study(ctx, task_name, task, kind, sizes, 2 * i + j)
    data = {"sizes": sizes.__dict__, "results": results,
            "examples": {name: {"train": len(t.train_x), "test": len(t.test_x),
                                "length": t.train_x.shape[1], "vocab_size": t.vocab_size}
                         for name, t in tasks.items()},
            "anchor_tau": list(ANCHOR_TAU), "weights": WEIGHTS, "code_task": CODE_TASK}
    result = summarise(results, data)
    from qkv.compare.explain_figures import figures  # it reads this module's names

    result.figures = figures(ctx, results)
    data["seconds"] = time.perf_counter() - start
    return result


ROW = Row(name="explain", title="Weights are not explanations", run=run, minutes=3.0)
