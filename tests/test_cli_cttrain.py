"""The `cttrain` CLI: what a user sees (exit codes, one-line errors, JSON) for every command."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cv import tiny_store  # tests/ is on sys.path (pytest prepend mode)
from typer.testing import CliRunner

from ctprep.naming import LABEL_NAMES
from cttrain.cli import _parse_devices, app, resolve_config
from cttrain.config import ConfigError, load_config
from cttrain.cv import write_run_config

runner = CliRunner()


def assert_one_line_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err
    assert len(err.splitlines()) == 1 or all(line.startswith(" ") for line in err.splitlines()[1:]), err
    flat = " ".join(err.split())  # rich may wrap a long line on a narrow terminal
    for needle in needles:
        assert needle in flat, (needle, flat)
    return flat


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("cli") / "s.zarr", n=10, k=5)


def test_help_and_no_args():
    result = runner.invoke(app, [])
    assert "cv" in result.output and "predict" in result.output and "evaluate" in result.output
    for command in ("cv", "fold", "predict", "evaluate", "report"):
        result = runner.invoke(app, [command, "-h"])
        assert result.exit_code == 0, command
    assert "--devices" in runner.invoke(app, ["cv", "--help"]).output


def test_unknown_key_names_the_nearest(store, tmp_path):
    result = runner.invoke(app, ["cv", "--cache", str(store), "--out", str(tmp_path / "r"),
                                 "--set", "training.lrr=0.1"])
    assert_one_line_error(result, 2, "unknown key 'training.lrr'", "did you mean 'lr'")
    assert not (tmp_path / "r").exists()


def test_unsafe_yaml_is_refused_and_never_runs(store, tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"training: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    result = runner.invoke(app, ["fold", "0", "--config", str(config), "--cache", str(store),
                                 "--out", str(tmp_path / "r")])
    assert_one_line_error(result, 2, "evil.yaml", "not a safe YAML config")
    assert not marker.exists()


def test_missing_store_and_fold_mismatch(store, tmp_path):
    result = runner.invoke(app, ["cv", "--cache", str(tmp_path / "nowhere.zarr"), "--out", str(tmp_path / "r")])
    assert_one_line_error(result, 1, "nowhere.zarr", "no ctprep store")
    result = runner.invoke(app, ["cv", "--cache", str(store), "--folds", "3", "--out", str(tmp_path / "r")])
    assert_one_line_error(result, 1, "store has 5 folds; --folds 3 asked", "ctprep make-folds", "--folds 3")
    result = runner.invoke(app, ["fold", "7", "--cache", str(store), "--out", str(tmp_path / "r")])
    assert_one_line_error(result, 1, "fold 7")


def test_resume_refuses_a_changed_config(store, tmp_path):
    run = tmp_path / "run"
    write_run_config(load_config(overrides=[f"data.cache={store}", "training.lr=0.001"]), run)
    result = runner.invoke(app, ["cv", "--out", str(run), "--resume", "--set", "training.lr=0.01"])
    assert_one_line_error(result, 2, "--resume", "training.lr: 0.001 -> 0.01")
    result = runner.invoke(app, ["cv", "--out", str(run), "--resume", "--seed", "7"])
    assert_one_line_error(result, 2, "training.seed: 42 -> 7")


def test_resume_compares_only_what_the_yaml_sets(store, tmp_path):
    run = tmp_path / "run"
    # the first run's flags put data.cache and folds.k into the saved config; the YAML does not name them
    write_run_config(load_config(overrides=[f"data.cache={store}", "folds.k=5", "training.lr=0.001"]), run)
    same = tmp_path / "same.yaml"
    same.write_text("training:\n  lr: 0.001\n", encoding="utf-8")
    cfg = resolve_config(same, [], {}, run, resume=True)
    assert cfg.data.cache == str(store) and cfg.folds.k == 5
    other = tmp_path / "other.yaml"
    other.write_text("training:\n  lr: 0.002\n  device: cpu\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"training\.lr: 0\.001 -> 0\.002"):
        resolve_config(other, [], {}, run, resume=True)
    assert resolve_config(other, [], {}, run, resume=False).training.lr == 0.002  # a new run: the YAML rules


def test_parse_devices():
    assert _parse_devices("0,1") == ["cuda:0", "cuda:1"]
    assert _parse_devices("cpu, cuda:3") == ["cpu", "cuda:3"]
    assert _parse_devices(None) is None


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_evaluate_json_and_table(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(12, len(LABEL_NAMES)))
    y[0, 3] = 1 - y[1:, 3].max()  # keep both classes in label 3 whatever the draw
    p = np.clip(0.4 * y + rng.uniform(0, 0.6, size=y.shape), 0, 1)
    names = [f"valid_{i}_a_1.nii.gz" for i in range(12)]
    labels = _write_csv(tmp_path / "labels.csv", ["VolumeName", *LABEL_NAMES],
                        [[n, *r] for n, r in zip(names, y, strict=True)])
    preds = _write_csv(tmp_path / "pred.csv", ["VolumeName", "fold", *LABEL_NAMES],
                       [[n.replace(".nii.gz", ".mha"), 0, *r] for n, r in zip(names, p, strict=True)])
    result = runner.invoke(app, ["evaluate", str(preds), "--labels", str(labels), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"macro", "per_label", "crg", "n", "predictions"}
    assert data["predictions"] == {"path": str(preds), "format": "csv", "probabilities": None}
    assert set(data["macro"]) == {"auroc", "f1", "precision", "recall", "accuracy"}
    assert list(data["per_label"]) == list(LABEL_NAMES) and data["n"] == 12
    assert 0.5 < data["macro"]["auroc"] <= 1.0

    # a label with one class has no AUROC: JSON null, not NaN
    y[:, 5] = 0
    _write_csv(labels, ["VolumeName", *LABEL_NAMES], [[n, *r] for n, r in zip(names, y, strict=True)])
    data = json.loads(runner.invoke(app, ["evaluate", str(preds), "--labels", str(labels), "--json"]).stdout)
    assert data["per_label"][LABEL_NAMES[5]]["auroc"] is None

    table = runner.invoke(app, ["evaluate", str(preds), "--labels", str(labels)])
    assert table.exit_code == 0 and "macro" in table.stdout and "AUROC" in table.stdout
    assert "CRG" in table.stdout and "skipped (one class): Hiatal hernia" in table.stdout


def test_evaluate_bad_input_is_one_line(tmp_path):
    labels = _write_csv(tmp_path / "labels.csv", ["VolumeName", *LABEL_NAMES], [["a.nii.gz", *([0] * 18)]])
    preds = _write_csv(tmp_path / "pred.csv", ["VolumeName", *LABEL_NAMES], [["a.nii.gz", "x", *([0.1] * 17)]])
    result = runner.invoke(app, ["evaluate", str(preds), "--labels", str(labels)])
    assert_one_line_error(result, 1, "pred.csv", "row 2")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "none.csv"), "--labels", str(labels)])
    assert_one_line_error(result, 1, "none.csv")


def test_report_on_a_missing_run_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "norun")])
    assert_one_line_error(result, 1, "norun", "not found")


def test_python_m_cttrain_works():
    out = subprocess.run([sys.executable, "-m", "cttrain", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "predict" in out.stdout
