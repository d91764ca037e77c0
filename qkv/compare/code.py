"""Row `code`: the three matched models on real code (the stdlib corpus `qkv train` uses).

A transformer, an LSTM and a TCN with matched parameter counts (qkv.nn.matched_models) train
with one budget (the same steps, batches, windows and rate) on the corpus's training split. On
the test split the row reports bits per byte (beside the byte bigram fitted to the training
split) and the loss at each position of the test windows: position t predicts token t + 1 from
the t + 1 tokens up to it, so a loss that keeps falling hundreds of positions in means the model
uses context that far back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qkv.compare.core import Context, Row, RowResult, fit, markdown_table
from qkv.data import BigramModel, LMWindows
from qkv.nn.baselines import MODEL_KINDS, matched_models, parameter_counts
from qkv.train.config import TrainConfig
from qkv.train.data import BatchStream, prepare_data
from qkv.train.evaluate import evaluate

# Seed offsets (ctx.seed(offset)): the models' initial weights and the training batches' order.
# The test split is a fixed part of the corpus and is read in order.
INIT_SEED, TRAIN_SEED = 0, 1


@dataclass(frozen=True)
class Sizes:
    """The corpus, the models and the one training budget they all get."""

    max_bytes: int = 3_000_000  # corpus cap, TrainConfig's default
    vocab_size: int = 2048  # BPE, TrainConfig's default
    seq_len: int = 512
    d_model: int = 128  # the transformer's (TrainConfig's default model); baselines matched
    n_layers: int = 4
    n_heads: int = 4
    steps: int = 120
    batch_size: int = 8
    lr: float = 2e-3
    test_windows: int | None = None  # the first this many test windows; None: every one
    eval_batch: int = 16


FULL = Sizes()
QUICK = Sizes(max_bytes=120_000, vocab_size=320, seq_len=64, d_model=32, n_layers=2,
              steps=8, batch_size=4, test_windows=24)


@torch.no_grad()
def window_losses(model: torch.nn.Module, windows: LMWindows, *, batch_size: int = 16,
                  max_windows: int | None = None) -> torch.Tensor:
    """(N, L) float64: the next-token loss in nats at each position of each window.

    Row i is window i (all windows, or the first max_windows); entry t is the cross-entropy of
    the model's prediction at position t of its target (the token at t + 1 of the stream).
    `model` follows DecoderLM's convention: model(x (B, L)) -> (logits (B, L, V), _).
    """
    n = len(windows) if max_windows is None else min(len(windows), max_windows)
    if n == 0:
        raise ValueError("window_losses needs at least one window")
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, n, batch_size):
        xs, ys = zip(*(windows[i] for i in range(start, min(n, start + batch_size))),
                     strict=True)
        x, y = torch.stack(xs), torch.stack(ys)  # (b, L)
        logits, _ = model(x)  # (b, L, V)
        rows.append(F.cross_entropy(logits.double().transpose(1, 2), y, reduction="none"))
    model.train(was_training)
    return torch.cat(rows)  # (N, L)


def position_losses(model: torch.nn.Module, windows: LMWindows, *, batch_size: int = 16,
                    max_windows: int | None = None) -> torch.Tensor:
    """(L,) float64: the mean next-token loss in nats at each position, over the windows
    (window_losses averaged over windows)."""
    return window_losses(model, windows, batch_size=batch_size, max_windows=max_windows).mean(0)


def first_windows(windows: LMWindows, n: int | None) -> LMWindows:
    """The first n windows (all of them when n is None or at least their number)."""
    if n is None or n >= len(windows):
        return windows
    if n < 1:
        raise ValueError(f"n must be a positive number of windows, got {n}")
    return LMWindows(windows.tokens[:(n - 1) * windows.stride + windows.seq_len + 1],
                     windows.seq_len, windows.stride)


def window_files(windows: LMWindows, eos_id: int) -> torch.Tensor:
    """(N,) long: for each window, the index of the file its first token belongs to (the number
    of eos tokens before it; the stream is the files end to end, each followed by eos)."""
    before = torch.cumsum(windows.tokens == eos_id, 0) - (windows.tokens == eos_id).long()
    return before[torch.arange(len(windows)) * windows.stride]


def span_drop(losses: torch.Tensor, early: tuple[int, int], late: tuple[int, int],
              files: torch.Tensor | None = None) -> tuple[float, float, int]:
    """(mean over windows, standard error, independent units) of how much lower the loss is in
    span `late` than in span `early` (positions from 1, inclusive); losses (N, L) from
    window_losses.

    Neighbouring windows of one file are not independent, so with `files` ((N,), from
    window_files) the standard error is cluster-robust with each file's windows one cluster:
    sqrt(G / (G - 1) * sum over files of (the file's summed deviations from the mean)^2) / N,
    over G files. Without it (or with one file per window) it is the usual std / sqrt(N).
    """
    drop = (losses[:, early[0] - 1:early[1]].mean(1) - losses[:, late[0] - 1:late[1]].mean(1))
    n, mean = drop.numel(), drop.mean()
    if files is None:
        files = torch.arange(n)
    if files.shape != drop.shape:
        raise ValueError(f"files must give one file per window ({n}), "
                         f"got shape {tuple(files.shape)}")
    _, group = torch.unique(files, return_inverse=True)
    g = int(group.max()) + 1
    sums = torch.zeros(g, dtype=drop.dtype).index_add_(0, group, drop - mean)
    se = float((g / (g - 1) * (sums ** 2).sum()).sqrt() / n) if g > 1 else float("nan")
    return float(mean), se, g


def span_mean(losses: torch.Tensor | list[float], first: int, last: int) -> float:
    """The mean of losses over positions first..last, counted from 1 and inclusive."""
    return float(torch.as_tensor(losses, dtype=torch.float64)[first - 1:last].mean())


def spans(seq_len: int) -> list[tuple[int, int]]:
    """The reported position spans (from 1, inclusive): 1..8, L/8..L/4 and 7L/8..L (1-8,
    64-128 and 448-512 at L = 512)."""
    return [(1, min(8, seq_len)), (max(1, seq_len // 8), max(1, seq_len // 4)),
            (max(1, seq_len - seq_len // 8), seq_len)]


def _log_bins(losses: list[float]) -> tuple[list[float], list[float]]:
    """Losses averaged in log-spaced position bins: (bin centres, bin means)."""
    n = len(losses)
    edges = np.unique(np.round(np.geomspace(1, n + 1, 24)).astype(int))
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):  # positions lo .. hi - 1
        centres.append(float(np.sqrt(lo * (hi - 1))))
        means.append(float(np.mean(losses[lo - 1:hi - 1])))
    return centres, means


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` values, one per value (the first window - 1 average
    over the values so far). Smooths the training-loss curves of the code and position rows."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _figure(ctx: Context, results: dict, sizes: Sizes) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in MODEL_KINDS:
        r = results[kind]
        centres, means = _log_bins(r["position_loss"])
        left.plot(centres, means, marker=".", label=f"{kind} ({r['params'] / 1e6:.2f}M)")
        window = max(1, sizes.steps // 20)
        smoothed = moving_average(r["train_losses"], window)
        right.plot(range(1, len(smoothed) + 1), smoothed, label=kind)
    left.set_xscale("log")
    left.set_xlabel("position in the test window (tokens, log scale)")
    left.set_ylabel("test loss (nats per token, log-binned)")
    left.set_title(f"Loss against context position (stdlib code, L = {sizes.seq_len})")
    left.legend()
    right.set_xlabel("training step")
    right.set_ylabel("training loss (nats per token, moving average)")
    right.set_title(f"Training, same budget: {sizes.steps} steps x {sizes.batch_size} windows")
    right.legend()
    return ctx.save_figure(fig, "code_position_loss.png")


def _train_and_test(ctx: Context, sizes: Sizes, data, total: int) -> dict:
    """Train the three matched models with one budget; their test metrics."""
    s = sizes
    ctx.manual_seed(INIT_SEED)
    models = matched_models(data.tokenizer.vocab_size, d_model=s.d_model, n_layers=s.n_layers,
                            n_heads=s.n_heads, seq_len=s.seq_len)
    counts = parameter_counts(models)
    train, test = data.windows("train", s.seq_len), data.windows("test", s.seq_len)
    test = first_windows(test, s.test_windows)
    files = window_files(test, data.tokenizer.eos_id)
    results = {}
    for i, kind in enumerate(MODEL_KINDS):
        model = models[kind]
        stream = BatchStream(train, s.batch_size, seed=ctx.seed(TRAIN_SEED))  # same batches
        start = time.perf_counter()
        losses = fit(model, lambda step, stream=stream: stream.next(), steps=s.steps, lr=s.lr,
                     progress=lambda step, i=i, kind=kind: ctx.progress(
                         f"code: training {kind}", i * s.steps + step, total))
        seconds = time.perf_counter() - start
        ctx.progress(f"code: testing {kind}", (i + 1) * s.steps, total)
        metrics = evaluate(model, test, data.token_bytes, batch_size=s.eval_batch)
        per_window = window_losses(model, test, batch_size=s.eval_batch)  # (N, L)
        (_, _), mid, late = spans(s.seq_len)
        drop, drop_se, n_files = span_drop(per_window, mid, late, files)
        results[kind] = {"params": counts[kind], "config": asdict(model.config),
                         "train_losses": losses, "train_seconds": seconds,
                         "test_loss": metrics["loss"], "test_bpb": metrics["bpb"],
                         "test_tokens": metrics["tokens"], "test_bytes": metrics["bytes"],
                         "position_loss": per_window.mean(0).tolist(),
                         "long_range_drop": drop, "long_range_drop_se": drop_se,
                         "test_windows": per_window.shape[0], "test_files": n_files}
    return results


def _findings(results: dict, bigram: float, span_list) -> tuple[str, bool]:
    """What the numbers show, and whether attention uses the long context best."""
    (_, _), (m0, m1), (l0, l1) = span_list
    gain = {k: results[k]["long_range_drop"] for k in MODEL_KINDS}
    se = {k: results[k]["long_range_drop_se"] for k in MODEL_KINDS}
    bpb = {k: results[k]["test_bpb"] for k in MODEL_KINDS}
    n_files = results[MODEL_KINDS[0]]["test_files"]
    best_bpb = min(bpb, key=bpb.get)
    using = [k for k in MODEL_KINDS if gain[k] > 2 * se[k]]  # a drop of two standard errors
    text = ("Bits per byte on the test split: " + ", ".join(f"{k} {bpb[k]:.3f}" for k in bpb)
            + f" (byte bigram {bigram:.3f}); from positions {m0}-{m1} to {l0}-{l1} the loss "
            "falls by " + ", ".join(f"{gain[k]:+.3f} ± {se[k]:.3f}" for k in gain) + " nats "
            f"({'/'.join(MODEL_KINDS)}; ± one standard error with the test windows clustered "
            f"by file ({n_files} files{'; one gives no error' if n_files == 1 else ''}), since "
            "neighbouring windows of one file are not independent). ")
    agrees = best_bpb == "transformer" and "transformer" in using and \
        gain["transformer"] == max(gain.values())
    if agrees:
        text += ("The transformer predicts best and is the one that gains most from context "
                 "hundreds of tokens back.")
    elif not using:
        text += (f"The {best_bpb} predicts best, but no model's loss falls measurably between "
                 f"those spans at this small budget: none is shown to use context hundreds of "
                 "tokens back, so the claim is NOT shown here.")
    else:
        text += (f"The {best_bpb} predicts best and the {max(gain, key=gain.get)} gains most "
                 "from distant context, so the claim that attention uses long context best is "
                 "NOT shown here.")
    return text, agrees


def run(ctx: Context) -> RowResult:
    s = QUICK if ctx.quick else FULL
    total = len(MODEL_KINDS) * s.steps
    start = time.perf_counter()
    ctx.progress("code: tokenizing the stdlib corpus", 0, total)
    config = TrainConfig(max_bytes=s.max_bytes, vocab_size=s.vocab_size, seq_len=s.seq_len,
                         batch_size=s.batch_size, seed=ctx.seed(TRAIN_SEED))
    data = prepare_data(config)
    bigram = BigramModel.fit(data.corpus.texts("train")).bits_per_byte(data.corpus.texts("test"))
    prepare_seconds = time.perf_counter() - start
    results = _train_and_test(ctx, s, data, total)
    span_list = spans(s.seq_len)
    figure = _figure(ctx, results, s)
    findings, agrees = _findings(results, bigram, span_list)
    span_names = [f"loss {a}-{b}" for a, b in span_list]
    rows = []
    for kind in MODEL_KINDS:
        r = results[kind]
        means = [span_mean(r["position_loss"], a, b) for a, b in span_list]
        rows.append([kind, r["params"], r["test_bpb"], r["test_loss"], *means,
                     means[0] - means[2], r["long_range_drop"], r["long_range_drop_se"],
                     r["train_seconds"]])
    rows.append(["byte bigram", None, bigram, None] + [None] * (len(span_list) + 4))
    a, m, last = span_names
    table = markdown_table(
        ["model", "params", "test bits/byte", "test loss (nats/token)", *span_names,
         f"drop {a[5:]} to {last[5:]}", f"drop {m[5:]} to {last[5:]}", "± s.e. (by file)",
         "train s"],
        rows)
    headline = ("bits/byte " + ", ".join(f"{k} {results[k]['test_bpb']:.3f}" for k in MODEL_KINDS)
                + f", bigram {bigram:.3f}; loss at {m[5:]} -> {last[5:]}: "
                + ", ".join(f"{k} {row[5]:.2f}->{row[6]:.2f}"
                            for k, row in zip(MODEL_KINDS, rows, strict=False)))
    return RowResult(
        claim="At matched size and training budget, attention uses context hundreds of tokens "
              "back on real code better than recurrence (LSTM) or dilated convolution (TCN).",
        anchor="No published number for this corpus; the claim is the common reading of "
               "Vaswani et al. 2017 (a path of length one between any two tokens) against "
               "recurrent and convolutional models.",
        findings=findings, agrees=agrees, headline=headline, tables=[table], figures=[figure],
        data={"sizes": asdict(s), "corpus": data.describe(),
              "vocab_size": data.tokenizer.vocab_size,
              "bigram_bpb": bigram, "spans": [list(p) for p in span_list],
              "models": results, "prepare_seconds": prepare_seconds,
              "seconds": time.perf_counter() - start})


ROW = Row(name="code", title="Real code", run=run, minutes=7.0)
