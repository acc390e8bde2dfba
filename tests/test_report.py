"""`make_report` on a small fake run directory: figures, report.md, and missing inputs."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ctprep.naming import LABEL_NAMES
from cttrain.metrics import challenge_metrics, jsonable
from cttrain.report import FIGURES, ReportError, make_report
from cttrain.thresholds import save_thresholds, tune_thresholds

LABELS = list(LABEL_NAMES)
K = 3


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _fake_run(root: Path, n: int = 90, seed: int = 0) -> Path:
    """The files `cttrain cv` leaves behind, filled with a weakly informative fake model."""
    rng = np.random.default_rng(seed)
    run = root / "run"
    results = run / "results"
    names = [f"train_{i}_a_1.nii.gz" for i in range(n)]
    folds = np.arange(n) % K
    y = (rng.random((n, len(LABELS))) < rng.uniform(0.08, 0.45, len(LABELS))).astype(int)
    y[:, 3] = 0  # one label never positive: no ROC, no AUROC bar
    probs = np.clip(0.15 + 0.3 * y * rng.uniform(0.2, 1.0, len(LABELS)) + rng.normal(0, 0.12, y.shape), 0, 1)
    probs = np.round(probs, 6)
    _write_csv(results / "oof_predictions.csv", ["VolumeName", "fold", *LABELS],
               [[nm[:-7], f, *p] for nm, f, p in zip(names, folds, probs.tolist(), strict=True)])
    _write_csv(results / "oof_labels.csv", ["VolumeName", *LABELS],
               [[nm, *row] for nm, row in zip(names, y.tolist(), strict=True)])
    for k in range(K):
        rows = folds == k
        metrics = challenge_metrics(y[rows], probs[rows], LABELS)
        (results / f"fold_{k}.json").write_text(json.dumps(jsonable({"fold": k, "metrics": metrics})), encoding="utf-8")
        epochs = np.arange(1, 9)
        log = [[e, 0.7 * 0.85**e + 0.02 * k, 0.75 * 0.9**e + 0.03 * k, 0.55 + 0.03 * e - 0.01 * k,
                0.2 + 0.02 * e, 1e-3] for e in epochs]
        _write_csv(run / "logs" / f"fold_{k}" / "metrics.csv",
                   ["epoch", "train_loss", "val_loss", "val_auroc", "val_f1", "lr"], log)
    pooled = challenge_metrics(y, probs, LABELS)
    summary = {"auroc_macro": "0.6458 ± 0.0234", "valid_folds": K, "total_folds": K, "oof_epoch": ["last"],
               "metrics": {"auroc_macro": {"mean": 0.6458, "std": 0.0234}, "crg": {"mean": 0.41, "std": 0.02}},
               "oof": {"auroc_macro": pooled["macro"]["auroc"], "crg": pooled["crg"], "f1_macro_tuned": 0.31,
                       "crg_tuned": 0.52, "threshold_method": "f1"}}
    (results / "cv_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    save_thresholds(results / "thresholds.json", LABELS, tune_thresholds(y, probs, "f1"), "f1", {})
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_report_writes_all_figures_and_markdown(tmp_path):
    run = _fake_run(tmp_path)
    paths = make_report(run)
    report = run / "report"
    assert {p.name for p in paths} == {f"{name}.png" for name in FIGURES} | {"report.md"}
    for name in FIGURES:
        png = report / f"{name}.png"
        width, height = _png_size(png)
        assert width >= 600 and height >= 300 and png.stat().st_size > 20_000, (name, width, height)
    text = (report / "report.md").read_text(encoding="utf-8")
    for name in FIGURES:
        assert f"]({name}.png)" in text
    assert "0.6458 ± 0.0234" in text  # from cv_summary.json
    assert "Each fold's result is its last epoch's validation." in text  # the rule cv_summary names
    assert "| Cardiomegaly |" in text and "tuned threshold" in text
    assert "## Notes" not in text  # nothing was missing


def test_report_skips_missing_inputs_with_notes(tmp_path):
    run = _fake_run(tmp_path)
    (run / "results" / "oof_labels.csv").unlink()
    for k in range(K):
        (run / "logs" / f"fold_{k}" / "metrics.csv").unlink()
    (run / "results" / "cv_summary.json").unlink()
    (run / "report").mkdir()
    (run / "report" / "roc_curves.png").write_bytes(b"stale")

    paths = make_report(run)
    assert [p.name for p in paths] == ["auroc_by_label.png", "report.md"]  # from fold_k.json alone
    assert not (run / "report" / "roc_curves.png").exists()  # stale figure removed, not embedded
    text = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "oof_labels.csv" in text and "Training curves: no `logs/fold_k/metrics.csv`" in text
    assert "cv_summary.json` not found" in text


def test_report_on_bad_run_dir(tmp_path):
    with pytest.raises(ReportError, match="run directory not found"):
        make_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no results/ or logs/"):
        make_report(tmp_path / "empty")
    broken = tmp_path / "broken"
    (broken / "results").mkdir(parents=True)
    (broken / "results" / "fold_0.json").write_text("{not json", encoding="utf-8")
    paths = make_report(broken)  # nothing usable: only report.md, with notes, and no crash
    assert [p.name for p in paths] == ["report.md"]
    assert "fold_0.json` unreadable" in paths[0].read_text(encoding="utf-8")
