"""Report figures (matplotlib, PNG bytes): a metric against an axis with 95 % intervals as error bars, and
per-run training curves (loss, teacher entropy) that show collapse or divergence at a glance."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def metric_vs_axis(summary: pd.DataFrame, by: list[str], metric: str, label: str) -> bytes:
    """The cells' means of `metric` against the first axis with their 95 % intervals as error bars
    (reports/stats.py), one line per value of the second; the random-init evaluation, when the runs
    have one, as a horizontal line with its interval as a band."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    cells = summary[summary["kind"] == "cell"] if "kind" in summary else summary
    groups = cells.groupby(by[1]) if len(by) > 1 else [(None, cells)]
    for value, g in groups:
        g = g[g[f"{metric}_n"] > 0]
        if g.empty:
            continue
        x = [str(v) for v in g[by[0]]]
        low = (g[metric] - g[f"{metric}_low"]).fillna(0).clip(lower=0)
        high = (g[f"{metric}_high"] - g[metric]).fillna(0).clip(lower=0)
        ax.errorbar(x, g[metric], yerr=[low, high], marker="o", capsize=4,
                    label=f"{by[1]}={value}" if value is not None else None)  # fmt: skip
    labelled = len(by) > 1
    init = (
        summary[(summary["kind"] == "random init") & (summary[f"{metric}_n"] > 0)]
        if "kind" in summary
        else []
    )
    if len(init):
        row = init.iloc[0]
        ax.axhline(row[metric], color="grey", linestyle="--", linewidth=1,
                   label=f"random init (n={int(row[f'{metric}_n'])})")  # fmt: skip
        if not pd.isna(row[f"{metric}_low"]):
            ax.axhspan(row[f"{metric}_low"], row[f"{metric}_high"], color="grey", alpha=0.15)
        labelled = True
    ax.set_xlabel(by[0])
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=8)
    return _png(fig)


def curves(histories: dict[str, list[tuple[int, float]]], ylabel: str, hline: float | None = None) -> bytes:
    """One line per run (step, value); `hline` marks a reference level (ln K for the entropy)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in sorted(histories.items()):
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=name, linewidth=1.2, marker="o" if len(steps) < 5 else None)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=0.8, label="ln K (uniform)")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)
