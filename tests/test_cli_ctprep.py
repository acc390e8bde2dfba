"""The ctprep command line end to end through CliRunner: synth -> build-cache -> make-folds -> info
-> preview, plus the one-line errors a user sees."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ctprep.cli import app
from ctprep.naming import LABEL_NAMES
from ctprep.store import open_store

runner = CliRunner()
SMALL = ["--set", "preprocess.shape=[8, 32, 32]", "--set", "preprocess.spacing=[12, 8, 8]"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    result = runner.invoke(app, ["synth", str(out), "--patients", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "s.zarr"
    args = ["build-cache", "--data-dir", str(dataset),
            "--labels", str(dataset / "multi_abnormality_labels" / "train_predicted_labels.csv"),
            "--metadata", str(dataset / "metadata" / "train_metadata.csv"), "--out", str(path), *SMALL]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return path


def test_synth_writes_the_ctrate_layout(dataset):
    labels_csv = dataset / "multi_abnormality_labels" / "train_predicted_labels.csv"
    header = labels_csv.read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",") == ["VolumeName", *LABEL_NAMES]
    assert list((dataset / "train").glob("train_*/train_*_*/train_*_*_*.nii.gz"))


def test_build_cache_fills_every_row(store):
    s = open_store(store)
    assert s.written().all() and s.image_shape == (8, 3, 32, 32)
    assert set(s.patient_ids) == {f"train_{p}" for p in range(1, 5)}
    assert {s.row_info(i)["hu_rule"] for i in range(s.n)} <= {"hu", "raw-metadata"}


def test_make_folds_info_and_preview(store, tmp_path):
    result = runner.invoke(app, ["make-folds", str(store), "--folds", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "patient-disjoint" in result.output
    result = runner.invoke(app, ["info", str(store), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["volumes"] == info["written"] == open_store(store).n
    assert info["folds"]["k"] == 2 and info["folds"]["unassigned"] == 0
    assert [w["name"] for w in info["windows"]] == ["lung", "mediastinum", "wide"]
    name = open_store(store).volume_names[0]
    png = tmp_path / "p.png"
    result = runner.invoke(app, ["preview", str(store), name, "--out", str(png)])
    assert result.exit_code == 0, result.output
    import cv2

    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 3 * 32 and image.std() > 10


def test_rerun_is_a_no_op_and_changed_config_is_refused(dataset, store):
    labels = str(dataset / "multi_abnormality_labels" / "train_predicted_labels.csv")
    base = ["build-cache", "--data-dir", str(dataset), "--labels", labels, "--out", str(store)]
    before = open_store(store).read_images(0)
    result = runner.invoke(app, [*base, *SMALL, "--metadata", str(dataset / "metadata" / "train_metadata.csv")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*base, *SMALL, "--set", "preprocess.clahe_tiles=4"])
    assert result.exit_code != 0
    assert "preprocess.clahe_tiles" in result.output and "Traceback" not in result.output
    assert np.array_equal(open_store(store).read_images(0), before)


def test_user_errors_are_one_line_without_traceback(tmp_path, dataset):
    result = runner.invoke(app, ["info", str(tmp_path / "nothing.zarr")])
    assert result.exit_code == 2 and "no ctprep store" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["build-cache", "--data-dir", str(dataset), "--labels", str(tmp_path / "no.csv"),
                                 "--out", str(tmp_path / "x.zarr")])
    assert result.exit_code != 0 and "no.csv" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["build-cache", "--data-dir", str(dataset), "--labels", str(tmp_path / "no.csv"),
                                 "--out", str(tmp_path / "x.zarr"), "--set", "preprocess.spacin=[1,1,1]"])
    assert result.exit_code == 2 and "did you mean 'spacing'" in result.output
    assert not (tmp_path / "x.zarr").exists()


def test_synth_renders_only_the_chosen_labels(tmp_path):
    import csv

    result = runner.invoke(app, ["synth", str(tmp_path), "--patients", "3", "--seed", "1",
                                 "--labels", "Cardiomegaly, Lung nodule"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "multi_abnormality_labels" / "train_predicted_labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    others = [name for name in LABEL_NAMES if name not in ("Cardiomegaly", "Lung nodule")]
    assert all(row[name] == "0" for row in rows for name in others)
    result = runner.invoke(app, ["synth", str(tmp_path / "x"), "--labels", "Lung nodules"])
    assert result.exit_code == 2 and "unknown label 'Lung nodules'" in result.output


def test_ctprep_never_imports_torch_or_cttrain():
    import subprocess
    import sys

    code = ("import sys, ctprep.cli, ctprep.build, ctprep.workers, ctprep.pipeline, ctprep.folds, ctprep.info, "
            "ctprep.synth, ctprep.store; print(sorted(m for m in ('torch', 'cttrain', 'albumentations') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
