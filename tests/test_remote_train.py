"""Training streams from a remote store (the local moto S3 server): `make-folds` and `cttrain fold 0`
on an s3:// store give exactly the metrics of the same run on a local copy, through a forked
DataLoader worker, and no credential ends up in the run directory or a side file."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from ctprep import remote
from ctprep.cli import app as ctprep_app
from cttrain.cli import app as cttrain_app

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SETS = ["--set", "preprocess.shape=[8, 32, 32]", "--set", "preprocess.spacing=[20, 10, 10]"]
TRAIN = ["--set", "training.epochs=1", "--set", "data.slices=4", "--set", "model.tiny_width=8",
         "--set", "data.batch_size=4", "--set", "data.num_workers=1"]
runner = CliRunner()


def _ok(app, args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_fold_on_the_remote_store_gives_the_metrics_of_a_local_copy(s3, tmp_path):
    raw, local = tmp_path / "raw", tmp_path / "s.zarr"
    url = s3.url("train/s.zarr")
    creds = ["--storage-option", f"key={s3.key}", "--storage-option", f"secret={s3.secret}"]
    _ok(ctprep_app, ["synth", raw, "--patients", 6, "--seed", 0])
    labels = raw / "multi_abnormality_labels" / "train_predicted_labels.csv"
    build = ["build-cache", "--data-dir", raw, "--labels", labels, "--metadata",
             raw / "metadata" / "train_metadata.csv", "--config", DEMO, *SETS]
    _ok(ctprep_app, [*build, "--out", local])
    _ok(ctprep_app, [*build, "--out", url, *creds])
    for store in (local, url):
        _ok(ctprep_app, ["make-folds", store, "--folds", 2, "--seed", 0, *creds])
    assert remote.exists(f"{url}.folds.json")

    results = {}
    for name, store in (("local", local), ("remote", url)):
        run = tmp_path / f"run_{name}"
        _ok(cttrain_app, ["fold", 0, "--config", DEMO, "--cache", store, "--folds", 2, "--out", run, *TRAIN, *creds])
        results[name] = json.loads((run / "results" / "fold_0.json").read_text(encoding="utf-8"))
    assert results["remote"]["metrics"] == results["local"]["metrics"]
    assert results["remote"]["n_val"] == results["local"]["n_val"] > 0

    written = [p for p in (tmp_path / "run_remote").rglob("*") if p.is_file()]
    written += [f"{url}.folds.json", f"{url}.failures.json"]
    assert written and not [str(p) for p in written if s3.secret.encode() in _bytes(p)]


def _bytes(target) -> bytes:
    return remote.read_text(target).encode() if isinstance(target, str) else Path(target).read_bytes()
