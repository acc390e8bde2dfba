"""Per-label decision thresholds, tuned on out-of-fold predictions, and folded into probabilities.

The challenge thresholds every label at a fixed `p >= 0.5`, so a tuned threshold `t` only helps if
the exported probabilities are remapped so that `t` lands on 0.5. `remap` does that with a strictly
increasing piecewise-linear map per label, which leaves AUROC (a ranking metric) unchanged.

Tuning methods (all per label; a label with one class in the tuning data keeps 0.5):
- `f1`: the threshold that maximises F1 of the positive class.
- `youden`: the threshold that maximises Youden's J = TPR − FPR (Youden, "Index for rating
  diagnostic tests", Cancer 1950).
- `crg`: the thresholds that maximise the pooled CRG score (Hamamci et al., MIDL 2025,
  arXiv:2505.17167). CRG = U / (2U − s) grows with s = r·TP − r·FN − FP, and with FN = A − TP this
  is s = Σ_label (2r·TP_label − FP_label) − r·A: a sum of per-label terms, so maximising each label's
  2r·TP − FP is the exact coordinate-wise optimum of the pooled score, found in one pass.

A tuned threshold is the midpoint between two neighbouring distinct scores, so the decision on the
tuning data is reproduced exactly and unseen scores near the cut are split evenly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

METHODS: tuple[str, ...] = ("f1", "youden", "crg")
# Thresholds are kept strictly inside (0, 1) so both linear pieces of `remap` have a slope.
_EPS = 1e-6


class ThresholdsError(ValueError):
    """A thresholds file or argument is invalid (the message names the file or key)."""


def _cuts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct decision on one label: (threshold, TP, FP) per cut, positive iff p >= t.

    Cut i (i < m) predicts positive the scores >= the i-th smallest distinct score; cut m predicts
    nothing positive.
    """
    values, inverse = np.unique(p, return_inverse=True)
    positives = np.bincount(inverse, weights=y.astype(np.float64), minlength=len(values))
    totals = np.bincount(inverse, minlength=len(values)).astype(np.float64)
    tp = np.append(np.cumsum(positives[::-1])[::-1], 0.0)
    fp = np.append(np.cumsum(totals[::-1])[::-1], 0.0) - tp
    lower = np.concatenate([[0.0], values])
    upper = np.append(values, 1.0)
    return np.clip((lower + upper) / 2, _EPS, 1 - _EPS), tp, fp


def _objective(method: str, tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int, r: float
               ) -> np.ndarray:
    if method == "f1":
        return 2 * tp / (2 * tp + fp + (n_pos - tp))  # n_pos > 0, so the denominator is > 0
    if method == "youden":
        return tp / n_pos - fp / n_neg
    return 2 * r * tp - fp  # crg: this label's share of s (see the module docstring)


def _best_threshold(thresholds: np.ndarray, scores: np.ndarray) -> float:
    """The best-scoring threshold; among ties the one nearest the default 0.5 (least change)."""
    best = scores.max()
    tied = np.flatnonzero(scores >= best - 1e-12 * max(1.0, abs(best)))
    return float(thresholds[tied[np.argmin(np.abs(thresholds[tied] - 0.5))]])


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray, method: str = "f1") -> np.ndarray:
    """Per-label thresholds (L,) tuned on (N, L) labels and probabilities with `method`
    (f1 | youden | crg, see the module docstring). One-class labels get 0.5."""
    if method not in METHODS:
        raise ThresholdsError(f"unknown threshold method {method!r}; choose one of {', '.join(METHODS)}")
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ThresholdsError(f"y_true {y.shape} and probs {p.shape} must be 2-D with the same shape")
    n_pos_total = int(y.sum())
    # CRG's r = (X − A) / (2A) is a property of the whole label matrix, not of one label.
    r = (y.size - n_pos_total) / (2 * n_pos_total) if n_pos_total else 0.0
    out = np.full(y.shape[1], 0.5)
    for j in range(y.shape[1]):
        n_pos = int(y[:, j].sum())
        n_neg = y.shape[0] - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        thresholds, tp, fp = _cuts(y[:, j], p[:, j])
        out[j] = _best_threshold(thresholds, _objective(method, tp, fp, n_pos, n_neg, r))
    return out


def remap(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Map each label's [0, t] linearly onto [0, 0.5] and [t, 1] onto [0.5, 1].

    `p >= t` becomes `remap(p) >= 0.5`, the map is strictly increasing (AUROC is unchanged) and
    0, t, 1 go to 0, 0.5, 1, so the outputs stay probabilities.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    if p.ndim != 2 or t.shape != (p.shape[1],):
        raise ThresholdsError(f"probs {p.shape} needs one threshold per column; got thresholds {t.shape}")
    if not ((t > 0) & (t < 1)).all():
        raise ThresholdsError("thresholds must lie strictly between 0 and 1")
    if not np.isfinite(p).all() or p.min(initial=0.0) < 0 or p.max(initial=1.0) > 1:
        raise ThresholdsError("probs must be finite and within [0, 1]")
    below = 0.5 * p / t
    above = 0.5 + 0.5 * (p - t) / (1 - t)
    return np.where(p >= t, above, below)


def nested_fold_thresholds(y_true: np.ndarray, probs: np.ndarray, folds: np.ndarray,
                           method: str = "f1") -> dict[int, np.ndarray]:
    """Thresholds for each fold k tuned on the other folds' out-of-fold predictions only.

    Applying fold k's thresholds to fold k's predictions gives an honest estimate of what tuning
    buys on unseen data: the scored rows never influence their own thresholds. Rows with a negative
    fold (never held out) are ignored.
    """
    f = np.asarray(folds).astype(int)
    y = np.asarray(y_true)
    p = np.asarray(probs)
    if f.shape != (y.shape[0],):
        raise ThresholdsError(f"folds has shape {f.shape}; expected ({y.shape[0]},), one per row")
    out = {}
    for k in sorted(int(v) for v in np.unique(f[f >= 0])):
        train = (f >= 0) & (f != k)
        out[k] = tune_thresholds(y[train], p[train], method)
    return out


def apply_fold_thresholds(probs: np.ndarray, folds: np.ndarray,
                          fold_thresholds: dict[int, np.ndarray]) -> np.ndarray:
    """Remap each row with the thresholds of its own fold (from `nested_fold_thresholds`)."""
    p = np.asarray(probs, dtype=np.float64)
    f = np.asarray(folds).astype(int)
    missing = sorted(set(np.unique(f).tolist()) - set(fold_thresholds))
    if missing:
        raise ThresholdsError(f"no thresholds for fold(s) {missing}")
    out = np.empty_like(p)
    for k, thresholds in fold_thresholds.items():
        rows = f == k
        if rows.any():
            out[rows] = remap(p[rows], thresholds)
    return out


def save_thresholds(path: str | Path, label_names: Sequence[str], thresholds: np.ndarray, method: str,
                    meta: dict | None = None) -> Path:
    """Write `{"method", "label_names", "thresholds": {label: t}, **meta}` atomically."""
    names = list(label_names)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (len(names),):
        raise ThresholdsError(f"{len(names)} label names but thresholds has shape {t.shape}")
    payload = {"method": method, "label_names": names,
               "thresholds": {name: float(v) for name, v in zip(names, t, strict=True)}}
    for key, value in (meta or {}).items():
        payload.setdefault(key, value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a crash never leaves a half-written thresholds file
    return path


def load_thresholds(path: str | Path, label_names: Sequence[str] | None = None
                    ) -> tuple[np.ndarray, dict]:
    """Read a thresholds file; returns (thresholds in `label_names` order, or the file's own order,
    and the whole parsed JSON)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ThresholdsError(f"{path}: thresholds file not found") from None
    except json.JSONDecodeError as exc:
        raise ThresholdsError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    table = data.get("thresholds") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ThresholdsError(f"{path}: missing key 'thresholds' (a mapping label -> threshold)")
    names = list(label_names) if label_names is not None else list(data.get("label_names") or table)
    values = []
    for name in names:
        if name not in table:
            raise ThresholdsError(f"{path}: no threshold for label {name!r}")
        value = table[name]
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ThresholdsError(f"{path}: threshold for {name!r} must be a number in (0, 1), got {value!r}")
        values.append(float(value))
    return np.array(values), data
