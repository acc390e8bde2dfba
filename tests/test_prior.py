"""`model.floor_prior` (cttrain/prior.py) and `training.precise_bn`: the two fixes for fold models
that disagree in calibration (pooled out-of-fold AUROC far below the fold-mean).

Checked: the prior is the floor's own model; the training rows' logits are cross-fitted without
patient leakage; a fold trained with a negligible learning rate predicts exactly the floor of its
rows (so offsets reach the right rows through the loader, augmentation and validation), and
`cttrain predict` rebuilds the same numbers from the checkpoint alone; precise BatchNorm statistics
are the training average whatever the running statistics were."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from test_baseline import EMPHYSEMA, METAL, phantom_store  # tests/ is on sys.path (pytest prepend mode)
from test_engine import tiny_cfg

from cttrain import distributed
from cttrain.baseline import featurize, fit_predict, run_floor
from cttrain.checkpoint import load_checkpoint
from cttrain.cv import write_run_config
from cttrain.engine import FoldRun, train_fold
from cttrain.predict import ensemble_probs, record_store
from cttrain.prior import FloorPrior, crossfit_logits, fit_prior
from cttrain.trainer import Trainer


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return phantom_store(tmp_path_factory.mktemp("prior") / "visible.zarr")


def test_prior_is_the_floors_model_and_survives_its_state():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7))
    labels = np.stack([(x[:, 0] + rng.normal(0, 0.5, 60) > 0), np.zeros(60, bool)], axis=1).astype(np.int64)
    prior = fit_prior(x, labels)
    expected = fit_predict(x[:40], labels[:40, 0], x[40:])
    refit = fit_prior(x[:40], labels[:40])
    np.testing.assert_allclose(_sigmoid(refit.logits(x[40:])[:, 0]), expected, atol=1e-5)
    # a label with one class: its clipped prevalence, whatever the features
    assert np.allclose(_sigmoid(prior.logits(x)[:, 1]), 1e-3, rtol=1e-3)
    again = FloorPrior.from_state(prior.state())
    np.testing.assert_array_equal(again.logits(x), prior.logits(x))


def test_crossfit_keeps_a_patients_scans_together():
    """Two identical scans per patient and random labels: a row split would predict each scan from
    its twin (AUROC 0.85 here); the patient split leaves nothing to learn (near chance)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    x = np.repeat(rng.normal(size=(40, 30)), 2, axis=0)
    labels = np.repeat(rng.integers(0, 2, (40, 1)), 2, axis=0)
    patients = np.repeat([f"p{i}" for i in range(40)], 2)
    leaky = crossfit_logits(x, labels, [f"r{i}" for i in range(80)])  # every row its own "patient"
    honest = crossfit_logits(x, labels, patients)
    assert roc_auc_score(labels[:, 0], leaky[:, 0]) > 0.75
    assert abs(roc_auc_score(labels[:, 0], honest[:, 0]) - 0.5) < 0.2


def test_a_fold_starts_at_the_floor_and_predict_rebuilds_it(store, tmp_path):
    """lr 1e-9: the network's output stays ~0, so the fold's validation probabilities are its
    prior's on the floor's features of those rows, row for row (offsets reach the right rows through
    loader, MixUp and validation), close to the floor's own out-of-fold probabilities (the prior
    floors the standardisation of near-constant features, prior.MIN_SCALE), and `predict` rebuilds
    the same numbers from the checkpoint alone."""
    from ctprep.store import open_store
    from cttrain.reader import StoreReader, fold_rows

    cfg = tiny_cfg(store, **{"model.floor_prior": "true", "training.lr": "1e-9", "training.epochs": "1",
                             "augment.mixup_alpha": "0.4", "data.slices": "4"})
    run_dir = tmp_path / "run"
    write_run_config(cfg, run_dir)
    record_store(run_dir, store)
    train_fold(cfg, 0, run_dir, k=4, progress=False)
    reader = StoreReader(store)
    train, val, _ = fold_rows(reader, 0, 4)
    x, _ = featurize(reader, np.concatenate([train, val]), open_store(store).windows)
    prior = fit_prior(x[:len(train)], reader.labels[train].astype(np.int64))
    expected = {reader.volume_names[r]: p for r, p in zip(val, _sigmoid(prior.logits(x[len(train):])),
                                                          strict=True)}
    floor = run_floor(store, k=4)
    floor_p = {name: floor.probs[i] for i, name in enumerate(floor.volume_names) if floor.folds[i] == 0}
    with (run_dir / "results" / "fold_0_predictions.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(val)
    picked = [METAL, EMPHYSEMA]
    for row in rows:
        got = np.array([float(row[n]) for n in ("Medical material", "Emphysema")])
        np.testing.assert_allclose(got, expected[row["VolumeName"]][picked], atol=1e-5)
        np.testing.assert_allclose(got, floor_p[row["VolumeName"]][picked], atol=0.03)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "fold_0" / "fold_0_best_auroc.ckpt")
    assert set(ckpt["floor_prior"]) == {"mean", "scale", "coef", "intercept"}
    volumes, _, probs = ensemble_probs(run_dir, store, checkpoint="best_auroc", tta_flip=False,
                                       batch_size=None, device="cpu")
    by_name = dict(zip(volumes, probs, strict=True))
    for row in rows:
        np.testing.assert_allclose(by_name[row["VolumeName"]][picked], expected[row["VolumeName"]][picked],
                                   atol=1e-5)


def test_precise_bn_replaces_running_statistics_by_the_training_average(store):
    """recalibrate_bn: the result does not depend on the running statistics before it (momentum
    history), differs from them, and leaves each layer's momentum as it was."""
    cfg = tiny_cfg(store, **{"training.precise_bn": "true", "model.head_norm": "batch"})
    ctx = distributed.setup("cpu")
    run = FoldRun(cfg, 0, store.parent / "pbn_run", 4, ctx, None)
    trainer = Trainer(cfg, in_channels=run.in_channels, num_labels=len(run.label_names),
                      pos_freq=np.full(len(run.label_names), 0.3), steps_per_epoch=1, ctx=ctx)
    norms = [m for m in trainer.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    for m in norms:
        m.running_mean.fill_(5.0)
        m.running_var.fill_(9.0)
    assert trainer.recalibrate_bn(run.bn_loader()) == len(norms)
    first = [m.running_mean.clone() for m in norms]
    assert all(not torch.allclose(f, torch.full_like(f, 5.0)) for f in first)
    for m in norms:
        m.running_mean.fill_(-3.0)
    trainer.recalibrate_bn(run.bn_loader())
    for m, f in zip(norms, first, strict=True):
        torch.testing.assert_close(m.running_mean, f)
        assert m.momentum == 0.1
    assert trainer.model.training  # left in the mode it was in


def test_prior_logits_stay_finite_on_a_feature_constant_in_training():
    """A feature ~0 in every training row and not in a new one: finite, capped logits."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 3))
    x[:, 2] = 1e-9 * rng.random(40)  # e.g. a histogram bin no training volume reaches
    labels = (x[:, :1] > 0).astype(np.int64)
    prior = fit_prior(x, labels)
    new = np.array([[0.0, 0.0, 0.5]])
    z = prior.logits(new)
    assert np.isfinite(z).all() and np.abs(z).max() <= 20.0
