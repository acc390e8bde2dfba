"""Fold-ensemble prediction: CSV and VLM3D submission formats, new stores, store compatibility."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_cv import TINY, tiny_store  # tests/ is on sys.path (pytest prepend mode)
from typer.testing import CliRunner

from ctprep.config import PreprocessConfig, Window
from ctprep.naming import LABEL_NAMES
from ctprep.store import create_store
from cttrain.cli import app
from cttrain.config import load_config
from cttrain.cv import run_cv
from cttrain.predict import PredictError, find_checkpoints, predict, submission
from cttrain.thresholds import remap, save_thresholds

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    store = tiny_store(root / "train.zarr", n=12, k=2)
    cfg = load_config(overrides=[f"data.cache={store}", *TINY])
    run_cv(cfg, root / "run", k=2, console=Console(quiet=True))
    return root / "run"


def _read_csv(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Header and name -> label probabilities (the trailing `probabilities` kind column left out)."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    n = len(LABEL_NAMES)
    return rows[0], {r[0]: np.array([float(v) for v in r[1:1 + n]]) for r in rows[1:]}


def _kinds(path: Path) -> set[str]:
    with path.open(newline="") as fh:
        return {row["probabilities"] for row in csv.DictReader(fh)}


def new_store(path: Path, n: int = 5, written: int | None = None, shape=(4, 16, 16), center: float = -600) -> Path:
    """Fresh data: no folds, all-zero labels (unknown), maybe not every row written."""
    cfg = PreprocessConfig(shape=list(shape), windows=[Window("lung", center, 1500), Window("mediastinum", 40, 400)])
    names = [f"valid_{i}_a_1.nii.gz" for i in range(n)]
    store = create_store(path, volume_names=names, patient_ids=[f"valid_{i}" for i in range(n)],
                         labels=np.zeros((n, len(LABEL_NAMES)), np.uint8), label_names=LABEL_NAMES, cfg=cfg)
    rng = np.random.default_rng(5)
    for row in range(n if written is None else written):
        store.write_row(row, rng.integers(0, 255, size=(shape[0], 2, shape[1], shape[2]), dtype=np.uint8),
                        source="x", info={})
    return path


def test_checkpoints_found_per_fold(run):
    paths = find_checkpoints(run, "best_auroc")
    assert [p.name for p in paths] == ["fold_0_best_auroc.ckpt", "fold_1_best_auroc.ckpt"]
    assert all(p.name == "last.ckpt" for p in find_checkpoints(run, "last"))
    with pytest.raises(PredictError, match="no best_f1 checkpoint"):
        find_checkpoints(run.parent, "best_f1")


def test_csv_on_a_store_without_labels_or_folds(run, tmp_path):
    store = new_store(tmp_path / "new.zarr", n=5, written=4)
    out = predict(run, store, tmp_path / "pred.csv")
    header, rows = _read_csv(out)
    assert header == ["VolumeName", *LABEL_NAMES, "probabilities"]
    assert _kinds(out) == {"raw"}                                       # the csv default, recorded per row
    assert sorted(rows) == [f"valid_{i}_a_1.nii.gz" for i in range(4)]  # written rows only
    probs = np.stack(list(rows.values()))
    assert probs.shape == (4, 18) and ((probs > 0) & (probs < 1)).all()
    # the ensemble is the mean of the fold models: a run directory holding one fold's checkpoint each
    singles = []
    for fold in (0, 1):
        single = tmp_path / f"only_{fold}"
        shutil.copytree(run, single, ignore=shutil.ignore_patterns(f"fold_{1 - fold}"))
        singles.append(_read_csv(predict(single, store, tmp_path / f"f{fold}.csv"))[1])
    for name, p in rows.items():
        assert np.allclose(p, (singles[0][name] + singles[1][name]) / 2, atol=1e-7)
    assert not np.allclose(singles[0][name], singles[1][name], atol=1e-4)


def test_vlm3d_submission_is_remapped_with_thresholds(run, tmp_path):
    store = new_store(tmp_path / "new.zarr", n=3)
    raw = _read_csv(predict(run, store, tmp_path / "raw.csv"))[1]
    thresholds = np.linspace(0.2, 0.8, 18)
    save_thresholds(run / "results" / "thresholds.json", LABEL_NAMES, thresholds, "f1")
    out = predict(run, store, tmp_path / "sub.json", fmt="vlm3d")
    data = json.loads(out.read_text(encoding="utf-8"))
    assert isinstance(data, list) and list(data[0]) == ["outputs", "cttrain"]
    assert data[0]["cttrain"] == {"probabilities": "remapped"}
    predictions = data[0]["outputs"][0]["value"]["predictions"]
    assert [p["input_image_name"] for p in predictions] == [f"valid_{i}_a_1.nii.gz" for i in range(3)]
    for item in predictions:
        assert set(item) == {"input_image_name", "probabilities"}
        assert list(item["probabilities"]) == list(LABEL_NAMES)
        expected = remap(raw[item["input_image_name"]][None, :], thresholds)[0]
        got = np.array(list(item["probabilities"].values()))
        assert np.allclose(got, expected, atol=1e-6)
        assert not np.allclose(got, raw[item["input_image_name"]], atol=1e-3)  # the remap did something


def _official_arrays(submission_path: Path, labels_csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """(y, probs) the way the VLM3D evaluator builds them: forithmus/VLM3D-Dockers
    abnclass_evaluation/json_to_csv.py (case id = Path(name).stem without ".nii", a missing label key
    is 0.0), rows matched to the ground truth by that id."""
    data = json.loads(submission_path.read_text(encoding="utf-8"))
    scores = {}
    for item in data[0]["outputs"][0]["value"]["predictions"]:
        acc = Path(item["input_image_name"]).stem.replace(".nii", "")
        scores[acc] = [float(item["probabilities"].get(label, 0.0)) for label in LABEL_NAMES]
    with labels_csv.open(newline="") as fh:
        truth = {Path(r["VolumeName"]).stem.replace(".nii", ""): [int(r[label]) for label in LABEL_NAMES]
                 for r in csv.DictReader(fh)}
    ids = sorted(truth)
    return np.array([truth[i] for i in ids]), np.array([scores[i] for i in ids])


def test_evaluate_scores_the_submitted_json_like_the_official_code(run, tmp_path):
    from cttrain.evaluate import evaluate_files
    from cttrain.metrics import challenge_metrics

    store = new_store(tmp_path / "new.zarr", n=6)
    save_thresholds(run / "results" / "thresholds.json", LABEL_NAMES, np.linspace(0.3, 0.7, 18), "f1")
    sub = predict(run, store, tmp_path / "sub.json", fmt="vlm3d")
    remapped_csv = predict(run, store, tmp_path / "remapped.csv", remapped=True)
    raw_csv = predict(run, store, tmp_path / "raw.csv")
    assert _kinds(remapped_csv) == {"remapped"} and _kinds(raw_csv) == {"raw"}
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=(6, len(LABEL_NAMES)))
    y[0], y[1] = 1, 0                                                   # both classes in every label
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        csv.writer(fh).writerows([["VolumeName", *LABEL_NAMES],
                                  *[[f"valid_{i}_a_1.nii.gz", *y[i]] for i in range(6)]])
    from_json, from_csv = evaluate_files(sub, labels), evaluate_files(remapped_csv, labels)
    official = challenge_metrics(*_official_arrays(sub, labels), list(LABEL_NAMES))
    for result in (from_json, from_csv):
        assert result["macro"] == official["macro"] and result["crg"] == official["crg"]
        assert result["per_label"] == official["per_label"]
    assert from_json["predictions"] == {"path": str(sub), "format": "vlm3d", "probabilities": "remapped"}
    assert from_csv["predictions"]["probabilities"] == "remapped"
    raw = evaluate_files(raw_csv, labels)
    assert raw["predictions"]["probabilities"] == "raw"
    assert raw["macro"]["auroc"] == pytest.approx(from_json["macro"]["auroc"])     # the remap is monotone
    # what the CLI prints: which kind the file holds
    shown = runner.invoke(app, ["evaluate", str(sub), "--labels", str(labels)])
    assert shown.exit_code == 0, shown.output
    assert "VLM3D submission JSON" in shown.stdout and "threshold-remapped" in shown.stdout


def test_predict_raw_json_and_missing_thresholds(run, tmp_path):
    store = new_store(tmp_path / "new.zarr", n=2)
    out = predict(run, store, tmp_path / "raw.json", fmt="vlm3d", remapped=False)
    assert json.loads(out.read_text(encoding="utf-8"))[0]["cttrain"] == {"probabilities": "raw"}
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("thresholds.json"))
    with pytest.raises(PredictError, match="thresholds.json: missing.*--raw"):
        predict(bare, store, tmp_path / "x.csv", remapped=True)
    result = runner.invoke(app, ["predict", "--run", str(bare), "--cache", str(store), "--out",
                                 str(tmp_path / "y.csv"), "--remap"])
    assert result.exit_code == 1 and "--raw" in result.stderr and "Traceback" not in result.output


def test_store_mismatch_is_refused(run, tmp_path):
    with pytest.raises(PredictError, match=r"\(D, H, W\) = \(4, 8, 8\)"):
        predict(run, new_store(tmp_path / "small.zarr", shape=(4, 8, 8)), tmp_path / "p.csv")
    with pytest.raises(PredictError, match="window 'lung'"):
        predict(run, new_store(tmp_path / "win.zarr", center=-500), tmp_path / "p.csv")
    with pytest.raises(PredictError, match="not a cttrain run directory"):
        predict(tmp_path, new_store(tmp_path / "ok.zarr"), tmp_path / "p.csv")


def test_submission_needs_all_challenge_labels():
    with pytest.raises(PredictError, match="needs all 18"):
        submission(["a"], list(LABEL_NAMES[:17]), np.zeros((1, 17)))


def test_predict_cli_passes_tta(run, tmp_path, monkeypatch):
    import cttrain.engine

    seen = []
    real = cttrain.engine.predict_probs

    def spy(model, loader, device, amp_dtype=None, tta_flip=False, offsets=None):
        seen.append(tta_flip)
        return real(model, loader, device, amp_dtype=amp_dtype, tta_flip=tta_flip, offsets=offsets)

    monkeypatch.setattr(cttrain.engine, "predict_probs", spy)
    store = new_store(tmp_path / "new.zarr", n=3)
    for flag, expected in (([], False), (["--tta"], True), (["--no-tta"], False)):
        seen.clear()
        out = tmp_path / f"p{len(flag)}.csv"
        result = runner.invoke(app, ["predict", "--run", str(run), "--cache", str(store), "--out", str(out), *flag])
        assert result.exit_code == 0, result.output
        assert seen == [expected, expected]  # one call per fold model
        assert len(_read_csv(out)[1]) == 3
    result = runner.invoke(app, ["predict", "--run", str(run), "--cache", str(tmp_path / "none.zarr"),
                                 "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "none.zarr" in result.stderr
