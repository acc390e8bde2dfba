"""Threshold tuning, the monotone remap, nested per-fold thresholds and the thresholds file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cttrain.metrics import challenge_metrics, crg
from cttrain.thresholds import (
    ThresholdsError,
    apply_fold_thresholds,
    load_thresholds,
    nested_fold_thresholds,
    remap,
    save_thresholds,
    tune_thresholds,
)


def _skewed(n: int = 400, n_labels: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rare positives and under-confident scores: almost nothing reaches 0.5 although the ranking
    is good, the situation a focal-loss model on CT-RATE's imbalanced labels produces."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < 0.12).astype(int)
    probs = np.clip(0.05 + 0.2 * y + rng.normal(0, 0.07, y.shape), 0, 1)
    return y, probs


def test_remap_is_monotone_sends_threshold_to_half_and_keeps_auroc():
    y, probs = _skewed()
    thresholds = np.array([0.1, 0.2, 0.5, 0.9])
    mapped = remap(probs, thresholds)
    assert np.allclose(remap(thresholds[None, :], thresholds), 0.5, atol=0)
    assert ((mapped >= 0) & (mapped <= 1)).all()
    grid = np.linspace(0, 1, 1001)
    curve = remap(np.repeat(grid[:, None], 4, axis=1), thresholds)
    assert (np.diff(curve, axis=0) > 0).all()  # strictly increasing
    assert np.allclose(curve[[0, -1]], [[0] * 4, [1] * 4])
    for j in range(4):
        assert roc_auc_score(y[:, j], mapped[:, j]) == pytest.approx(roc_auc_score(y[:, j], probs[:, j]), abs=1e-12)
        assert np.array_equal(mapped[:, j] >= 0.5, probs[:, j] >= thresholds[j])


def test_remap_rejects_bad_input():
    with pytest.raises(ThresholdsError, match="strictly between 0 and 1"):
        remap(np.zeros((2, 1)), np.array([1.0]))
    with pytest.raises(ThresholdsError, match="within \\[0, 1\\]"):
        remap(np.full((2, 1), 1.5), np.array([0.3]))
    with pytest.raises(ThresholdsError, match="one threshold per column"):
        remap(np.zeros((2, 2)), np.array([0.3]))


@pytest.mark.parametrize("method", ["f1", "youden", "crg"])
def test_tuned_thresholds_raise_f1_after_remap_on_held_out_half(method):
    y, probs = _skewed(n=800)
    train, test = slice(0, 400), slice(400, 800)
    thresholds = tune_thresholds(y[train], probs[train], method)
    assert (thresholds < 0.5).all()  # the scores are under-confident, so every cut moves down
    names = list("abcd")
    before = challenge_metrics(y[test], probs[test], names)
    after = challenge_metrics(y[test], remap(probs[test], thresholds), names)
    assert before["macro"]["f1"] < 0.2
    assert after["macro"]["f1"] > before["macro"]["f1"] + 0.3
    assert after["macro"]["auroc"] == pytest.approx(before["macro"]["auroc"], abs=1e-12)


def test_f1_threshold_is_optimal_on_tuning_data():
    y, probs = _skewed(n=300, seed=4)
    thresholds = tune_thresholds(y, probs, "f1")
    tuned = challenge_metrics(y, remap(probs, thresholds), list("abcd"))
    for j, label in enumerate("abcd"):
        for t in np.unique(probs[:, j]):  # no cut at an observed score beats the tuned one
            pred = probs[:, j] >= t
            tp = (pred & (y[:, j] == 1)).sum()
            f1 = 2 * tp / (pred.sum() + y[:, j].sum())
            assert f1 <= tuned["per_label"][label]["f1"] + 1e-12


def test_crg_thresholds_maximise_pooled_crg():
    y, probs = _skewed(n=300, n_labels=3, seed=5)
    thresholds = tune_thresholds(y, probs, "crg")
    best = crg(y, probs >= thresholds)
    rng = np.random.default_rng(0)
    for _ in range(200):  # random alternative threshold vectors never do better
        other = rng.uniform(0.01, 0.6, 3)
        assert crg(y, probs >= other) <= best + 1e-12


def test_one_class_label_keeps_half_and_unknown_method_fails():
    y, probs = _skewed(n=100)
    y[:, 1] = 0
    assert tune_thresholds(y, probs, "f1")[1] == 0.5
    with pytest.raises(ThresholdsError, match="unknown threshold method 'best'"):
        tune_thresholds(y, probs, "best")


def test_nested_thresholds_never_use_the_scored_fold():
    y, probs = _skewed(n=600, seed=1)
    folds = np.arange(600) % 3
    folds[:7] = -1  # never held out: ignored
    nested = nested_fold_thresholds(y, probs, folds, "f1")
    assert sorted(nested) == [0, 1, 2]
    rows = (folds >= 0) & (folds != 1)
    assert np.array_equal(nested[1], tune_thresholds(y[rows], probs[rows], "f1"))

    rng = np.random.default_rng(9)
    y2, probs2 = y.copy(), probs.copy()
    in_fold = folds == 1
    probs2[in_fold] = rng.random((in_fold.sum(), y.shape[1]))
    y2[in_fold] = 1 - y2[in_fold]
    perturbed = nested_fold_thresholds(y2, probs2, folds, "f1")
    assert np.array_equal(perturbed[1], nested[1])  # fold 1's own data is never used for fold 1
    assert not np.array_equal(perturbed[0], nested[0])  # ... but it is used for the other folds

    mapped = apply_fold_thresholds(probs[folds >= 0], folds[folds >= 0], nested)
    rows = folds[folds >= 0] == 2
    assert np.array_equal(mapped[rows], remap(probs[folds >= 0][rows], nested[2]))
    with pytest.raises(ThresholdsError, match=r"no thresholds for fold\(s\) \[-1\]"):
        apply_fold_thresholds(probs, folds, nested)


def test_save_and_load_round_trip(tmp_path):
    names = ["Cardiomegaly", "Emphysema"]
    path = save_thresholds(tmp_path / "results" / "thresholds.json", names, np.array([0.2, 0.35]), "f1",
                           {"tuned_on": "oof", "n": 10})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["method"] == "f1" and data["thresholds"] == {"Cardiomegaly": 0.2, "Emphysema": 0.35}
    assert data["label_names"] == names and data["tuned_on"] == "oof"
    values, loaded = load_thresholds(path)
    assert np.array_equal(values, [0.2, 0.35]) and loaded["n"] == 10
    values, _ = load_thresholds(path, ["Emphysema", "Cardiomegaly"])
    assert np.array_equal(values, [0.35, 0.2])
    with pytest.raises(ThresholdsError, match="no threshold for label 'Atelectasis'"):
        load_thresholds(path, ["Atelectasis"])
    (tmp_path / "bad.json").write_text('{"thresholds": {"a": 1.5}}', encoding="utf-8")
    with pytest.raises(ThresholdsError, match=r"bad.json: threshold for 'a' must be a number in \(0, 1\)"):
        load_thresholds(tmp_path / "bad.json")
    with pytest.raises(ThresholdsError, match="not found"):
        load_thresholds(tmp_path / "missing.json")
