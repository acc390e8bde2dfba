"""Cross-validation orchestration: fold checks, OOF pooling, summaries, resume and the scheduler."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ctprep.config import PreprocessConfig, Window
from ctprep.naming import LABEL_NAMES
from ctprep.store import create_store, open_store
from cttrain.config import ConfigError, load_config
from cttrain.cv import CVError, check_folds, run_parallel, store_fold_count, summarize, write_run_config
from cttrain.metrics import challenge_metrics

HUMAN = re.compile(r"^\d\.\d{4} ± \d\.\d{4}$")


def tiny_store(path: Path, n: int = 12, k: int | None = 3, written: int | None = None, seed: int = 0,
               shape: tuple[int, int, int] = (4, 16, 16)) -> Path:
    """A store of `n` volumes whose label 0 is visible as a bright image (learnable in 1-2 epochs)."""
    rng = np.random.default_rng(seed)
    cfg = PreprocessConfig(shape=list(shape), windows=[Window("lung", -600, 1500), Window("mediastinum", 40, 400)])
    labels = rng.integers(0, 2, size=(n, len(LABEL_NAMES))).astype(np.uint8)
    labels[: n // 2, 0], labels[n // 2:, 0] = 1, 0
    names = [f"train_{i}_a_1.nii.gz" for i in range(n)]
    store = create_store(path, volume_names=names, patient_ids=[f"train_{i}" for i in range(n)], labels=labels,
                         label_names=LABEL_NAMES, cfg=cfg)
    d, h, w = shape
    for row in range(n if written is None else written):
        base = 200 if labels[row, 0] else 40
        images = np.clip(rng.normal(base, 20, size=(d, 2, h, w)), 0, 255).astype(np.uint8)
        store.write_row(row, images, source=f"src{row}", info={})
    if k is not None:
        store.write_folds(np.arange(n) % k, {"k": k, "seed": 0, "method": "test"})
    return path


def fake_fold_outputs(run_dir: Path, k: int = 3, n: int = 30, seed: int = 1, skip: tuple[int, ...] = ()) -> dict:
    """What engine.train_fold leaves in results/: fold_k.json and the fold's prediction/label CSVs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=(n, len(LABEL_NAMES)))
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, size=y.shape), 0, 1)
    names = [f"valid_{i}_a_1.nii.gz" for i in range(n)]
    folds = np.arange(n) % k
    results = run_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    for f in range(k):
        if f in skip:
            continue
        rows = np.flatnonzero(folds == f)
        with (results / f"fold_{f}_predictions.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["VolumeName", "fold", *LABEL_NAMES])
            w.writerows([names[i], f, *p[i]] for i in rows)
        with (results / f"fold_{f}_labels.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["VolumeName", *LABEL_NAMES])
            w.writerows([names[i], *y[i]] for i in rows[::-1])  # other order than the predictions
        metrics = challenge_metrics(y[rows], p[rows], LABEL_NAMES)
        (results / f"fold_{f}.json").write_text(json.dumps(
            {"fold": f, "best_epoch": 1, "epochs_run": 2, "metrics": metrics, "n_train": n - len(rows),
             "n_val": len(rows)}))
    return {"y": y, "p": p, "names": names, "folds": folds}


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_summary_fields_and_pooling(tmp_path):
    truth = fake_fold_outputs(tmp_path, k=3)
    summary = summarize(tmp_path, 3, method="f1")
    for key in ("auroc_macro", "f1_macro", "precision_macro", "recall_macro", "accuracy", "ranking_score"):
        assert HUMAN.match(summary[key]), (key, summary[key])
    assert summary["valid_folds"] == 3 and summary["total_folds"] == 3
    assert summary["oof_epoch"] == ["best"]  # fold files without oof_rule predate the honest rule
    aurocs = [challenge_metrics(truth["y"][truth["folds"] == f], truth["p"][truth["folds"] == f],
                                LABEL_NAMES)["macro"]["auroc"] for f in range(3)]
    assert summary["metrics"]["auroc_macro"]["mean"] == pytest.approx(np.mean(aurocs))
    assert summary["metrics"]["auroc_macro"]["std"] == pytest.approx(np.std(aurocs))
    assert summary["auroc_macro"] == f"{np.mean(aurocs):.4f} ± {np.std(aurocs):.4f}"
    assert set(summary["metrics"]) == {"auroc_macro", "f1_macro", "precision_macro", "recall_macro", "accuracy",
                                       "ranking_score", "crg"}
    pooled = challenge_metrics(truth["y"], truth["p"], LABEL_NAMES)
    assert summary["oof"]["auroc_macro"] == pytest.approx(pooled["macro"]["auroc"], abs=1e-6)
    assert summary["oof"]["crg"] == pytest.approx(pooled["crg"], abs=1e-6)
    assert summary["oof"]["f1_macro_tuned"] != summary["oof"]["f1_macro"]
    # the files on disk match what was returned
    assert json.loads((tmp_path / "results" / "cv_summary.json").read_text(encoding="utf-8")) == summary

    header, rows = read_csv(tmp_path / "results" / "oof_predictions.csv")
    assert header == ["VolumeName", "fold", *LABEL_NAMES]
    assert sorted(r[0] for r in rows) == sorted(truth["names"])  # every held-out row exactly once
    by_name = {r[0]: r for r in rows}
    i = 7
    assert int(by_name[truth["names"][i]][1]) == truth["folds"][i]
    assert np.allclose([float(v) for v in by_name[truth["names"][i]][2:]], truth["p"][i], atol=1e-7)
    label_header, label_rows = read_csv(tmp_path / "results" / "oof_labels.csv")
    assert label_header == ["VolumeName", *LABEL_NAMES]
    labels_by_name = {r[0]: [int(v) for v in r[1:]] for r in label_rows}
    assert labels_by_name[truth["names"][i]] == truth["y"][i].tolist()  # aligned although files were reordered

    thresholds = json.loads((tmp_path / "results" / "thresholds.json").read_text(encoding="utf-8"))
    assert thresholds["method"] == "f1" and list(thresholds["thresholds"]) == list(LABEL_NAMES)
    detailed = json.loads((tmp_path / "results" / "cv_results_detailed.json").read_text(encoding="utf-8"))
    assert set(detailed["folds"]) == {"0", "1", "2"}
    fold0 = detailed["folds"]["0"]
    assert {"f1_macro_untuned", "f1_macro_tuned", "nested_thresholds", "per_label"} <= set(fold0)
    assert set(detailed["oof"]["per_label"]) == set(LABEL_NAMES)


def test_summary_with_missing_fold_and_no_tuning(tmp_path):
    fake_fold_outputs(tmp_path, k=3, skip=(2,))
    summary = summarize(tmp_path, 3, method="none")
    assert summary["valid_folds"] == 2 and summary["total_folds"] == 3
    assert summary["missing_folds"] == [2]
    assert summary["oof"]["f1_macro_tuned"] == pytest.approx(summary["oof"]["f1_macro"])
    t = json.loads((tmp_path / "results" / "thresholds.json").read_text(encoding="utf-8"))["thresholds"]
    assert set(t.values()) == {0.5}


def test_summary_refuses_a_volume_held_out_twice(tmp_path):
    fake_fold_outputs(tmp_path, k=2, n=6)
    results = tmp_path / "results"
    lines = (results / "fold_1_predictions.csv").read_text(encoding="utf-8").splitlines()
    first_of_fold0 = (results / "fold_0_predictions.csv").read_text(encoding="utf-8").splitlines()[1].split(",")[0]
    lines[1] = ",".join([first_of_fold0, *lines[1].split(",")[1:]])
    (results / "fold_1_predictions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    labels = (results / "fold_1_labels.csv").read_text(encoding="utf-8")
    labels += first_of_fold0 + "," + ",".join(["0"] * 18) + "\n"
    (results / "fold_1_labels.csv").write_text(labels, encoding="utf-8")
    with pytest.raises(CVError, match="more than one fold"):
        summarize(tmp_path, 2, method="f1")


def test_summary_without_any_fold(tmp_path):
    with pytest.raises(CVError, match="no finished fold"):
        summarize(tmp_path, 3, method="f1")


def test_fold_count_and_mismatch(tmp_path):
    store = tiny_store(tmp_path / "s.zarr", n=10, k=5)
    assert store_fold_count(store) == 5
    check_folds(store, 5)
    with pytest.raises(CVError, match=r"store has 5 folds; --folds 3 asked; run ctprep make-folds .* --folds 3"):
        check_folds(store, 3)
    unsplit = tiny_store(tmp_path / "u.zarr", n=6, k=None)
    assert store_fold_count(unsplit) == 0
    with pytest.raises(CVError, match="no folds"):
        check_folds(unsplit, 3)
    # without the `folds` meta, the distinct fold values of written rows count
    no_meta = tiny_store(tmp_path / "m.zarr", n=8, k=None)
    open_store(no_meta, mode="r+").array("folds")[:] = np.arange(8) % 4
    assert store_fold_count(no_meta) == 4


def test_write_run_config_resume_conflict(tmp_path):
    cfg = load_config(overrides=["training.lr=0.001"])
    path = write_run_config(cfg, tmp_path)
    before = path.stat().st_mtime_ns
    # a runtime-only change (device) is the same experiment: the file is left alone
    write_run_config(load_config(overrides=["training.lr=0.001", "training.device=cpu"]), tmp_path, resume=True)
    assert path.stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match=r"training\.lr: 0\.001 -> 0\.002"):
        write_run_config(load_config(overrides=["training.lr=0.002"]), tmp_path, resume=True)
    write_run_config(load_config(overrides=["training.lr=0.002"]), tmp_path)  # a new run replaces it
    assert load_config(path).training.lr == 0.002


class _Console:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str) -> None:
        self.lines.append(text)


def test_parallel_scheduler_runs_each_fold_once_and_reports_failures(tmp_path):
    def command(run_dir, fold, k, device, resume):
        code = (f"import pathlib, sys; p = pathlib.Path({str(run_dir)!r}) / 'done'; p.mkdir(exist_ok=True); "
                f"(p / '{fold}_{device}').write_text('x'); sys.exit(3 if {fold} == 4 else 0)")
        return [sys.executable, "-c", code]

    console = _Console()
    with pytest.raises(CVError, match=r"fold 4 on dev[ab] \(exit 3"):
        run_parallel(tmp_path, [0, 1, 2, 3, 4], ["deva", "devb"], k=5, resume=False, console=console,
                     command=command, poll_s=0.05)
    done = sorted(os.listdir(tmp_path / "done"))
    assert sorted(int(name.split("_")[0]) for name in done) == [0, 1, 2, 3, 4]
    assert {name.split("_")[1] for name in done} == {"deva", "devb"}  # both devices took folds
    assert (tmp_path / "logs" / "fold_4" / "cttrain.log").exists()


TINY = ["model.backbone=tiny", "model.tiny_width=4", "model.attention=none", "model.attention_hidden=8",
        "model.channels_last=false", "data.slices=4", "data.slice_stride=1", "data.batch_size=4",
        "data.num_workers=0", "data.pin_memory=false", "training.epochs=1", "training.warmup_epochs=0",
        "training.device=cpu", "training.amp='off'", "augment.enabled=false"]


def _cv_args(store: Path, run: Path, *extra: str) -> list[str]:
    args = ["cv", "--cache", str(store), "--out", str(run), *extra]
    for item in TINY:
        args += ["--set", item]
    return args


def test_cv_end_to_end_pools_every_written_row_once_and_resumes(tmp_path):
    from typer.testing import CliRunner

    from cttrain.cli import app

    runner = CliRunner()
    store = tiny_store(tmp_path / "s.zarr", n=14, k=3, written=12)  # two rows never written
    run = tmp_path / "run"
    result = runner.invoke(app, _cv_args(store, run, "--seed", "3"))
    assert result.exit_code == 0, result.output
    results = run / "results"
    summary = json.loads((results / "cv_summary.json").read_text(encoding="utf-8"))
    assert summary["total_folds"] == 3 and summary["valid_folds"] == 3
    assert HUMAN.match(summary["auroc_macro"]) and HUMAN.match(summary["ranking_score"])
    header, rows = read_csv(results / "oof_predictions.csv")
    assert header == ["VolumeName", "fold", *LABEL_NAMES]
    written = open_store(store).written()
    expected = [name for name, w in zip(open_store(store).volume_names, written, strict=True) if w]
    assert sorted(r[0] for r in rows) == sorted(expected) and len(rows) == 12
    assert {int(r[1]) for r in rows} == {0, 1, 2}
    # `cttrain evaluate` on the pooled files reproduces the summary's pooled numbers exactly
    scored = runner.invoke(app, ["evaluate", str(results / "oof_predictions.csv"), "--labels",
                                 str(results / "oof_labels.csv"), "--json"])
    assert json.loads(scored.stdout)["macro"]["auroc"] == pytest.approx(summary["oof"]["auroc_macro"], abs=1e-12)
    saved = load_config(run / "config.yaml")
    assert saved.training.seed == 3 and saved.folds.seed == 3 and saved.folds.k == 3
    assert saved.data.cache == str(store)

    # fold 2 "interrupted": its result is gone, its last checkpoint is there; 0 and 1 are finished
    (results / "fold_2.json").unlink()
    stamps = {f: (results / f"fold_{f}.json").stat().st_mtime_ns for f in (0, 1)}
    ckpt_stamps = {f: (run / "checkpoints" / f"fold_{f}" / "last.ckpt").stat().st_mtime_ns for f in (0, 1)}
    result = runner.invoke(app, ["cv", "--out", str(run), "--resume"])
    assert result.exit_code == 0, result.output
    assert "already finished" in result.output
    assert {f: (results / f"fold_{f}.json").stat().st_mtime_ns for f in (0, 1)} == stamps
    assert {f: (run / "checkpoints" / f"fold_{f}" / "last.ckpt").stat().st_mtime_ns for f in (0, 1)} == ckpt_stamps
    assert (results / "fold_2.json").exists()
    assert json.loads((results / "cv_summary.json").read_text(encoding="utf-8"))["valid_folds"] == 3
