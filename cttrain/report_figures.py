"""The report's figures that need only a run's logs and pooled out-of-fold predictions: training
curves and calibration (`cttrain.report` draws the per-label ones and assembles report.md).

`run` is report.py's loaded run (`logs`: fold -> column -> values; `oof`: {"y", "probs", ...}).
A figure whose inputs are missing raises `Skip`, whose message becomes a note in report.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Skip(Exception):
    """A figure's inputs are missing; the message becomes a note in report.md."""


# (panel title, y label, (column, line style, legend name)) for the metrics.csv columns we plot.
_CURVES = (("Loss", "loss", (("train_loss", "-", "train"), ("val_loss", "--", "validation"))),
           ("Validation AUROC", "macro AUROC", (("val_auroc", "-", None),)),
           ("Validation F1 (p ≥ 0.5)", "macro F1", (("val_f1", "-", None),)))


def training_figure(run: Any) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    def present(column: str) -> bool:
        return any(column in log and np.isfinite(log[column]).any() for log in run.logs.values())

    panels = [(title, ylabel, [c for c in curves if present(c[0])]) for title, ylabel, curves in _CURVES]
    panels = [panel for panel in panels if panel[2]]
    if not panels:
        raise Skip("Training curves: no `logs/fold_k/metrics.csv` with loss or validation columns.")
    fig = Figure(figsize=(4.8 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, (ax, (title, ylabel, curves)) in enumerate(zip(axes, panels, strict=True)):
        for k, log in sorted(run.logs.items()):
            n = len(next(iter(log.values())))
            epochs = log["epoch"] if "epoch" in log else np.arange(1, n + 1)
            for column, style, _ in curves:
                if column in log:
                    ok = np.isfinite(log[column])
                    ax.plot(epochs[ok], log[column][ok], style, color=f"C{k % 10}", lw=1.5,
                            marker="o" if ok.sum() < 15 else None, ms=3)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        # Fold colours are shared by all panels: list them once; line styles where they mean something.
        handles = [Line2D([], [], color=f"C{k % 10}", label=f"fold {k}") for k in sorted(run.logs) if i == 0]
        handles += [Line2D([], [], color="0.3", ls=style, label=name) for _, style, name in curves if name]
        if handles:
            ax.legend(handles=handles, loc="best", framealpha=0.9)
    fig.suptitle("Training curves per fold")
    return fig


def calibration_figure(run: Any) -> Any:
    from matplotlib.figure import Figure

    if run.oof is None:
        raise Skip("Calibration: no usable out-of-fold predictions with labels.")
    y = run.oof["y"].ravel().astype(bool)
    p = run.oof["probs"].ravel()
    edges = np.linspace(0, 1, 11)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
    count = np.bincount(index, minlength=10)
    filled = count > 0
    confidence = np.bincount(index, weights=p, minlength=10)[filled] / count[filled]
    observed = np.bincount(index, weights=y, minlength=10)[filled] / count[filled]
    ece = float(np.sum(count[filled] / p.size * np.abs(observed - confidence)))
    fig = Figure(figsize=(10.5, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    centers = (edges[:-1] + edges[1:])[filled] / 2
    left.bar(centers, observed, width=0.09, color="C0", alpha=0.7, label="observed positive fraction")
    left.plot(confidence, observed, "o-", color="C3", ms=4, clip_on=False, label="mean predicted (x) vs observed (y)")
    left.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    left.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="fraction positive",
             title=f"Reliability, all labels pooled (ECE {ece:.3f})")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    right.hist([p[~y], p[y]], bins=edges, color=["0.6", "C3"], label=["negative", "positive"])
    right.set_yscale("log")
    right.axvline(0.5, ls="--", color="0.3", lw=1)
    right.set(xlim=(0, 1), xlabel="predicted probability", ylabel="predictions (log scale)",
              title=f"Score distribution ({y.sum()} positive of {y.size} cells)")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    fig.suptitle("Calibration of out-of-fold probabilities")
    return fig
