"""The floor as the network's starting point (`model.floor_prior`): the CNN learns the residual.

Measured on real anatomy (README, "Real-anatomy data sets"; BENCHMARKS §7): a logistic regression on
body-masked window histograms (the sanity floor, `cttrain/baseline.py`) beats every CNN recipe we
tried at demo scale on the density findings (effusion, emphysema, opacity), and the CNNs' fold
models are calibrated differently from fold to fold, so their pooled out-of-fold AUROC falls well
below their fold-mean. With `floor_prior: true` each fold fits the floor's model on its own
training rows and the network's output is

    logit = floor_logit(volume) + cnn_logit(volume)

with the head's last layer zero-initialised: training starts exactly at the floor and the CNN only
has to learn what the histograms miss (shape, place, small dense things). This is stacking, so the
training rows' floor logits are cross-fitted (each from a model that did not see that volume, on
patient-disjoint inner folds); otherwise the prior would be optimistic on the very rows the
residual learns from (the standard stacking argument; not measured separately here).
Validation rows (and `cttrain predict`) use the model fitted on all training rows; its parameters
travel in the checkpoint, so a prediction store needs nothing but its images.

The floor's features read every cached slice (up to baseline.MAX_SLICES) inside the body, not the
training sample of slices, so the prior is the same whichever slices an epoch draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cttrain.baseline import C_REG, featurize

INNER_FOLDS = 5
# Standardisation floor: a histogram bin that is ~0 in every training volume has a std near 0, and a
# validation volume with a few pixels there gets a huge z (measured: a logit of 1e9 and a validation
# loss of 1.5e9 on a 52-volume store). The floor's own sklearn model only saturates its
# probabilities there; as an additive logit the prior must stay finite, so the scale is floored and
# the logit capped. The floor is tiny on purpose: rare bins carry the metal and calcium signal
# (a floor of 1e-3 cost medical material 0.745 -> 0.586 pooled AUROC on the 6-label benchmark).
MIN_SCALE = 1e-6
MAX_LOGIT = 20.0  # |prior logit| cap (p = 2e-9): beyond it there is nothing left to rank


@dataclass
class FloorPrior:
    """Per-label StandardScaler + logistic regression, as plain arrays (checkpoint-safe)."""

    mean: np.ndarray       # (F,)
    scale: np.ndarray      # (F,)
    coef: np.ndarray       # (L, F), on standardised features
    intercept: np.ndarray  # (L,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, L) float32 logits of feature rows `x` (N, F)."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return np.clip(z @ self.coef.T + self.intercept, -MAX_LOGIT, MAX_LOGIT).astype(np.float32)

    def state(self) -> dict[str, list]:
        """Plain lists: loadable with torch.load(weights_only=True) and readable as JSON."""
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> FloorPrior:
        return cls(*(np.asarray(state[k], dtype=np.float64) for k in ("mean", "scale", "coef", "intercept")))


def _logit(p: float, eps: float = 1e-3) -> float:
    p = min(max(p, eps), 1 - eps)
    return float(np.log(p / (1 - p)))


def fit_prior(x: np.ndarray, labels: np.ndarray, c: float = C_REG) -> FloorPrior:
    """The floor's model (baseline.fit_predict's) fitted on (x, labels), as a FloorPrior. A label
    with one class in `labels` gets a constant logit of its (clipped) prevalence."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), MIN_SCALE)
    z = (x - mean) / scale
    coef = np.zeros((labels.shape[1], x.shape[1]))
    intercept = np.zeros(labels.shape[1])
    with threadpool_limits(1):  # tiny problems: a BLAS thread pool on shared cores only costs
        for j in range(labels.shape[1]):
            y = labels[:, j]
            if y.min() == y.max():
                intercept[j] = _logit(float(y.mean()))
                continue
            model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(z, y)
            coef[j], intercept[j] = model.coef_[0], model.intercept_[0]
    return FloorPrior(mean, scale, coef, intercept)


def crossfit_logits(x: np.ndarray, labels: np.ndarray, groups: Sequence[str], k: int = INNER_FOLDS,
                    seed: int = 0) -> np.ndarray:
    """(N, L) logits of every row from a prior fitted on the other inner folds (patient-disjoint:
    the folds split `groups`, so no patient's scans are on both sides)."""
    groups = np.asarray(groups)
    unique = np.unique(groups)
    k = max(2, min(k, len(unique)))
    rng = np.random.default_rng(seed)
    fold_of_group = dict(zip(rng.permutation(unique), np.arange(len(unique)) % k, strict=True))
    inner = np.array([fold_of_group[g] for g in groups])
    out = np.zeros(labels.shape, dtype=np.float32)
    for f in range(k):
        val = inner == f
        if val.any():
            out[val] = fit_prior(x[~val], labels[~val]).logits(x[val])
    return out


def fold_offsets(cache: str, windows: Sequence[dict], train_rows: np.ndarray, val_rows: np.ndarray,
                 seed: int) -> tuple[np.ndarray, FloorPrior]:
    """(offsets (store rows, L) float32, the prior fitted on all training rows) for one fold:
    cross-fitted floor logits on the training rows, the full-training prior's on the validation
    rows, 0 elsewhere (rows the fold does not use)."""
    from cttrain.reader import StoreReader

    reader = StoreReader(cache)  # every channel: the body mask may need one training does not use
    rows = np.concatenate([train_rows, val_rows]).astype(np.int64)
    x, _ = featurize(reader, rows, windows)
    x_train, x_val = x[:len(train_rows)], x[len(train_rows):]
    y_train = reader.labels[train_rows].astype(np.int64)
    prior = fit_prior(x_train, y_train)
    offsets = np.zeros((reader.n, reader.labels.shape[1]), dtype=np.float32)
    offsets[train_rows] = crossfit_logits(x_train, y_train, [reader.patient_ids[r] for r in train_rows], seed=seed)
    offsets[val_rows] = prior.logits(x_val)
    return offsets, prior


class StoreFeatures:
    """The floor's features of a prediction store's rows, computed once for all fold models."""

    def __init__(self, cache: str, windows: Sequence[dict], rows: np.ndarray) -> None:
        from cttrain.reader import StoreReader

        reader = StoreReader(cache)
        self.n, self.rows = reader.n, np.asarray(rows, dtype=np.int64)
        self.x, _ = featurize(reader, self.rows, windows)

    def offsets(self, prior: FloorPrior) -> np.ndarray:
        """(store rows, L) float32 logits of `prior` (0 on rows not featurised)."""
        out = np.zeros((self.n, len(prior.intercept)), dtype=np.float32)
        out[self.rows] = prior.logits(self.x)
        return out


__all__ = ["FloorPrior", "StoreFeatures", "crossfit_logits", "fit_prior", "fold_offsets"]
