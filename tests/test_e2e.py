"""The whole pipeline through both command lines, as a user runs it: synth -> build-cache ->
make-folds -> cv -> predict (csv and vlm3d) -> evaluate -> report. Small by default; the demo-sized
run that must actually learn is marked slow (`make test-all`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctprep.cli import app as ctprep_app
from ctprep.naming import LABEL_NAMES
from cttrain.cli import app as cttrain_app

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
runner = CliRunner()


def _ok(app, args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _demo_labels() -> tuple[str, ...]:
    """The synth arguments `make demo` uses for its labels (read from the Makefile, so the two cannot
    drift apart): `DEMO_LABELS ?=` empty renders all 18."""
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        if line.startswith("DEMO_LABELS"):
            value = line.split("=", 1)[1].strip()
            return ("--labels", value) if value else ()
    raise AssertionError("DEMO_LABELS not found in the Makefile")


def _prepare(tmp: Path, patients: int, sets: list[str], synth: tuple[str, ...] = ()) -> tuple[Path, Path]:
    raw, store = tmp / "raw", tmp / "cache" / "s.zarr"
    _ok(ctprep_app, ["synth", raw, "--patients", patients, "--seed", 0, *synth])
    labels = raw / "multi_abnormality_labels" / "train_predicted_labels.csv"
    _ok(ctprep_app, ["build-cache", "--data-dir", raw, "--labels", labels, "--metadata",
                     raw / "metadata" / "train_metadata.csv", "--out", store, "--config", DEMO, *sets])
    return store, labels


def test_small_pipeline_end_to_end(tmp_path):
    sets = ["--set", "preprocess.shape=[8, 32, 32]", "--set", "preprocess.spacing=[20, 10, 10]"]
    store, labels = _prepare(tmp_path, 6, sets)
    _ok(ctprep_app, ["make-folds", store, "--folds", 2, "--seed", 0])
    run = tmp_path / "run"
    train_sets = ["--set", "training.epochs=1", "--set", "data.slices=4", "--set", "model.tiny_width=8",
                  "--set", "data.batch_size=4"]
    _ok(cttrain_app, ["cv", "--config", DEMO, "--cache", store, "--folds", 2, "--out", run, *train_sets])
    summary = json.loads((run / "results" / "cv_summary.json").read_text(encoding="utf-8"))
    assert summary["total_folds"] == 2 and "±" in summary["auroc_macro"]
    assert summary["oof_epoch"] == ["last"]  # the default: each fold's last validation, not its best
    oof_header = (run / "results" / "oof_predictions.csv").read_text(encoding="utf-8").splitlines()[0]
    assert oof_header.split(",") == ["VolumeName", "fold", *LABEL_NAMES]

    pred_csv, sub = tmp_path / "pred.csv", tmp_path / "sub.json"
    _ok(cttrain_app, ["predict", "--run", run, "--cache", store, "--out", pred_csv])
    _ok(cttrain_app, ["predict", "--run", run, "--cache", store, "--out", sub, "--format", "vlm3d"])
    predictions = json.loads(sub.read_text(encoding="utf-8"))[0]["outputs"][0]["value"]["predictions"]
    assert set(predictions[0]["probabilities"]) == set(LABEL_NAMES)
    scored = json.loads(_ok(cttrain_app, ["evaluate", pred_csv, "--labels", labels, "--json"]).stdout)
    assert scored["n"] == len(predictions) and set(scored["macro"]) == {"auroc", "f1", "precision", "recall",
                                                                        "accuracy"}
    _ok(cttrain_app, ["report", run])
    assert (run / "report" / "report.md").exists()


@pytest.mark.slow
def test_demo_config_learns_the_synthetic_findings(tmp_path):
    """`make demo` without the synth cache: 5-fold CV on the demo config stays at its floor and
    learns the large findings (measured 2026-12-02 with each fold's last epoch: fold-mean 0.662 and,
    with val_every 4, 0.664 against the floor's 0.667; pooled emphysema 0.981 / 0.961, mosaic
    0.970 / 0.973, cardiomegaly 0.916 / 0.929)."""
    import csv

    from sklearn.metrics import roc_auc_score

    store, _labels = _prepare(tmp_path, 100, [], _demo_labels())
    _ok(ctprep_app, ["make-folds", store, "--folds", 5, "--config", DEMO])
    run = tmp_path / "run"
    _ok(cttrain_app, ["cv", "--config", DEMO, "--cache", store, "--folds", 5, "--out", run])
    summary = json.loads((run / "results" / "cv_summary.json").read_text(encoding="utf-8"))
    assert summary["valid_folds"] == 5
    # honest rule (last epoch): the demo CNN is at its floor, not above it (measured 2026-12-02:
    # fold-mean 0.662 against the floor's 0.667; issue 8 open). A collapse below the floor fails.
    assert summary["metrics"]["auroc_macro"]["mean"] > summary["floor"]["auroc_macro"] - 0.03, summary["auroc_macro"]
    tables = {}
    for name in ("oof_predictions.csv", "oof_labels.csv"):
        with (run / "results" / name).open(newline="", encoding="utf-8") as fh:
            tables[name] = {row["VolumeName"]: row for row in csv.DictReader(fh)}
    probs, labels = tables["oof_predictions.csv"], tables["oof_labels.csv"]
    # pooled, measured 2026-12-02 with the last-epoch rule: 0.981, 0.970, 0.916 (then 0.961, 0.973, 0.929)
    for label, least in (("Emphysema", 0.9), ("Mosaic attenuation pattern", 0.9), ("Cardiomegaly", 0.85)):
        auroc = roc_auc_score([int(labels[v][label]) for v in probs], [float(probs[v][label]) for v in probs])
        assert auroc >= least, (label, auroc)
