"""VLM3D Task 2 (multi-abnormality classification) challenge metrics.

The challenge scores each label separately and then takes the unweighted mean over labels:
precision, recall and F1 of the positive class (zero_division=0) and accuracy, all at a fixed
threshold `p >= 0.5`, and AUROC on the probabilities (labels with one class are skipped).
It also reports the CRG score (Hamamci et al., "CRG Score: A Distribution-Aware Clinical Metric for
Radiology Report Generation", MIDL 2025, arXiv:2505.17167), which pools TP, FN and FP over every
(volume, label) cell and weights misses by the label imbalance:

    X = L·N, A = total positives, r = (X − A) / (2A), U = (X − A) / 2,
    s = r·TP − r·FN − FP, CRG = U / (2U − s)

CRG is 0 when 2U − s = 0 and undefined when the ground truth has no positive at all.

numpy and scikit-learn only: the training loop, CV and the CLI all import this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MACRO_METRICS: tuple[str, ...] = ("auroc", "f1", "precision", "recall", "accuracy")


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, n_labels: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and values; returns (bool labels, float64 probabilities), both (N, L)."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or p.ndim != 2:
        raise ValueError(f"y_true and probs must be 2-D (volumes, labels); got {y.shape} and {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"y_true has shape {y.shape} but probs has shape {p.shape}")
    if n_labels is not None and y.shape[1] != n_labels:
        raise ValueError(f"{n_labels} label names given but the arrays have {y.shape[1]} label columns")
    if y.shape[0] == 0:
        raise ValueError("no volumes to score (0 rows)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    return y.astype(bool), p


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label TP, FP, FN, TN counts of binary (N, L) arrays."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(y_pred).astype(bool)
    return {
        "tp": (y & pred).sum(axis=0),
        "fp": (~y & pred).sum(axis=0),
        "fn": (y & ~pred).sum(axis=0),
        "tn": (~y & ~pred).sum(axis=0),
    }


def crg_from_counts(tp: int, fn: int, fp: int, n_cells: int, n_positives: int) -> float:
    """CRG from pooled counts; `n_cells` is X = L·N and `n_positives` is A."""
    if n_positives <= 0:
        raise ValueError("CRG is undefined: the ground truth contains no positive label at all")
    r = (n_cells - n_positives) / (2 * n_positives)
    u = (n_cells - n_positives) / 2
    s = r * tp - r * fn - fp
    denom = 2 * u - s
    # The evaluator defines CRG as 0 when the denominator vanishes (every cell positive, no FP).
    return 0.0 if denom == 0 else float(u / denom)


def crg(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """CRG of binary predictions, TP/FN/FP pooled over all labels (VLM3D evaluator)."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(y_pred).astype(bool)
    if y.shape != pred.shape:
        raise ValueError(f"y_true has shape {y.shape} but y_pred has shape {pred.shape}")
    counts = confusion_counts(y, pred)
    return crg_from_counts(int(counts["tp"].sum()), int(counts["fn"].sum()), int(counts["fp"].sum()),
                           n_cells=y.size, n_positives=int(y.sum()))


def per_label_auroc(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """AUROC per label; None for a label whose ground truth has one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    out: list[float | None] = []
    for j in range(y.shape[1]):
        column = y[:, j]
        if column.all() or not column.any():
            out.append(None)
        else:
            out.append(float(roc_auc_score(column, p[:, j])))
    return out


def macro_auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean AUROC over labels with both classes present; nan when no label has both."""
    y, p = _check_inputs(y_true, probs)
    valid = [a for a in per_label_auroc(y, p) if a is not None]
    return float(np.mean(valid)) if valid else math.nan


def challenge_metrics(y_true: np.ndarray, probs: np.ndarray, label_names: Sequence[str],
                      threshold: float = 0.5) -> dict:
    """The VLM3D Task 2 metrics of probabilities `probs` against 0/1 `y_true`, both (N, L).

    Returns `{"macro": {auroc, f1, precision, recall, accuracy}, "per_label": {label: {auroc (None
    if one class), f1, precision, recall, accuracy, positives, n, tp, fp, fn, tn}}, "crg": float or
    None (no positives at all), "auroc_skipped": [labels with one class], "n": N, "threshold": t}`.
    Macro precision/recall/F1/accuracy average over all labels, macro AUROC over two-class labels.
    """
    names = list(label_names)
    y, p = _check_inputs(y_true, probs, len(names))
    pred = p >= threshold  # the challenge's rule is ">=": a probability of exactly 0.5 is positive
    counts = confusion_counts(y, pred)
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    accuracy = (tp + tn) / y.shape[0]
    aurocs = per_label_auroc(y, p)

    per_label = {}
    for j, name in enumerate(names):
        per_label[name] = {
            "auroc": aurocs[j], "f1": float(f1[j]), "precision": float(precision[j]),
            "recall": float(recall[j]), "accuracy": float(accuracy[j]),
            "positives": int(y[:, j].sum()), "n": int(y.shape[0]),
            "tp": int(tp[j]), "fp": int(fp[j]), "fn": int(fn[j]), "tn": int(tn[j]),
        }
    valid_aurocs = [a for a in aurocs if a is not None]
    macro = {
        "auroc": float(np.mean(valid_aurocs)) if valid_aurocs else math.nan,
        "f1": float(f1.mean()), "precision": float(precision.mean()),
        "recall": float(recall.mean()), "accuracy": float(accuracy.mean()),
    }
    crg_value = None
    if y.any():
        crg_value = crg_from_counts(int(tp.sum()), int(fn.sum()), int(fp.sum()), y.size, int(y.sum()))
    return {
        "macro": macro,
        "per_label": per_label,
        "crg": crg_value,
        "auroc_skipped": [name for name, a in zip(names, aurocs, strict=True) if a is None],
        "n": int(y.shape[0]),
        "threshold": float(threshold),
    }


def ranking_score(macro: dict) -> float:
    """Mean of the five macro metrics (AUROC, F1, precision, recall, accuracy).

    This single number is ours, for choosing checkpoints and comparing runs; the challenge itself
    ranks teams by a points system over the individual metrics.
    """
    values = [float(macro[name]) if macro.get(name) is not None else math.nan for name in MACRO_METRICS]
    return float(np.mean(values))


def jsonable(obj: object) -> object:
    """A copy of `obj` that `json.dumps` accepts strictly: numpy scalars become Python numbers and
    NaN/inf become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
