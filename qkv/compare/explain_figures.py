"""The `explain` row's figures: rank agreement, planted-token recovery, the permutation test."""

from __future__ import annotations

from qkv.compare.core import Context
from qkv.compare.explain import ANCHOR_TAU, MEASURE_NAMES, MEASURES, MODEL_NAMES, MODELS, PAIRS

COLORS = {"bilstm": "tab:blue", "transformer": "tab:orange"}


def _model_legend(ax) -> None:
    """A legend right of ax: a patch per model, then ax's own labelled artists."""
    from matplotlib.patches import Patch

    handles = [Patch(color=COLORS[m], alpha=0.6, label=MODEL_NAMES[m]) for m in MODELS]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.02, 1.0))


def _boxes(ax, groups: list[tuple[str, str, list[float]]]) -> None:
    """One box per (label, model, values), coloured by model."""
    parts = ax.boxplot([values for _, _, values in groups], patch_artist=True, widths=0.6,
                       medianprops={"color": "k"})
    for box, (_, model, _) in zip(parts["boxes"], groups, strict=True):
        box.set(facecolor=COLORS[model], alpha=0.6)
    ax.set_xticks(range(1, len(groups) + 1), [label for label, _, _ in groups], fontsize=8,
                  rotation=20)


def figures(ctx: Context, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, len(results), figsize=(10, 4), sharey=True)
    for ax, (task, per_model) in zip(axes, results.items(), strict=True):
        ax.axhspan(*ANCHOR_TAU, color="0.85", label="Jain & Wallace 2019, BiLSTM (0.1–0.4)")
        _boxes(ax, [(MEASURE_NAMES[p], m, [t for t in per_model[m]["tau"][p]
                                                   if t == t]) for m in MODELS for p in PAIRS])
        ax.set(title=f"{task} task", xlabel="attention against")
    _model_legend(axes[-1])
    axes[0].set_ylabel("Kendall τ-b per test example")
    fig.suptitle("Rank agreement of attention with other importance measures")
    names.append(ctx.save_figure(fig, "explain_tau.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    planted, width = results["planted"], 0.38
    for i, m in enumerate(MODELS):
        ax.bar([k + (i - 0.5) * width for k in range(len(MEASURES))],
               [planted[m]["recovery"][k] for k in MEASURES], width, color=COLORS[m],
               label=MODEL_NAMES[m])
    ax.axhline(planted[MODELS[0]]["recovery_chance"], color="k", ls="--", label="chance (k/L)")
    ax.set_xticks(range(len(MEASURES)), [MEASURE_NAMES[k] for k in MEASURES])
    ax.set(ylim=(0, 1.05), ylabel="planted tokens among the top k (fraction)",
           xlabel="importance measure", title="Recovery of the planted tokens (k = number planted)")
    ax.legend(fontsize=8)
    names.append(ctx.save_figure(fig, "explain_recovery.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _boxes(ax, [(task, m, [max(t, 1e-6) for t in results[task][m]["permutation"][
        "per_example_median_tvd"]]) for task in results for m in MODELS])
    ax.set(yscale="log", ylabel="median TVD of the output over shuffles (floored at 1e-6)",
           xlabel="task", title="Permutation test: shuffled attention weights")
    _model_legend(ax)
    names.append(ctx.save_figure(fig, "explain_permutation.png"))
    return names
