"""The sanity floor (`cttrain baseline`, cttrain/baseline.py + floor.py): the body mask, learning a
visible finding, chance on constant images and shuffled labels, its place in `cv` and the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_cv import TINY, fake_fold_outputs, read_csv  # tests/ is on sys.path (pytest prepend mode)
from test_report import _fake_run
from typer.testing import CliRunner

from ctprep.config import PreprocessConfig, Window
from ctprep.naming import LABEL_NAMES
from ctprep.store import create_store
from ctprep.windows import windows_to_channels
from cttrain.baseline import body_mask, body_window, feature_names, run_floor, volume_features
from cttrain.cli import app
from cttrain.cv import summarize
from cttrain.floor import FLOOR_JSON, chance_margin, floor_lines
from cttrain.report import make_report

runner = CliRunner()
WINDOWS = [Window("lung", -600, 1500), Window("mediastinum", 40, 400)]
METAL, EMPHYSEMA = LABEL_NAMES.index("Medical material"), LABEL_NAMES.index("Emphysema")
SHAPE = (6, 32, 32)


def phantom(rng: np.random.Generator, metal: bool, emphysema: bool) -> np.ndarray:
    """(D, H, W) HU: air, an elliptic body of soft tissue with two lungs, a bed-like strip below the
    body (outside it), and, per label, a small metal blob (2000 HU) or darker lungs (-950 HU)."""
    d, h, w = SHAPE
    yy, xx = np.mgrid[:h, :w]
    ry, rx = rng.uniform(10, 12), rng.uniform(12, 14)
    body = ((yy - 15) / ry) ** 2 + ((xx - 16) / rx) ** 2 <= 1
    lungs = (((yy - 14) / 6) ** 2 + ((xx - 10) / 4) ** 2 <= 1) | (((yy - 14) / 6) ** 2 + ((xx - 22) / 4) ** 2 <= 1)
    hu = np.full((d, h, w), -1000.0)
    hu[:, body] = 40.0
    hu[:, lungs] = -950.0 if emphysema else -850.0
    hu[:, 30, 4:28] = 200.0  # the table: tissue-dense, not body
    if metal:
        y, x = rng.integers(20, 23), rng.integers(12, 19)
        hu[1:4, y:y + 3, x:x + 3] = 2000.0
    return hu + rng.normal(0, 15, size=hu.shape)


def phantom_store(path: Path, n: int = 48, k: int = 4, seed: int = 0, shuffle: bool = False,
                  constant: bool = False) -> Path:
    """A store whose Medical material and Emphysema labels are visible (the other labels all 0).
    `shuffle`: the stored labels are a permutation of those rendered; `constant`: every pixel is 128."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, len(LABEL_NAMES)), dtype=np.uint8)
    truth[:, METAL] = np.arange(n) % 2
    truth[:, EMPHYSEMA] = (np.arange(n) // 2) % 2
    labels = truth[rng.permutation(n)] if shuffle else truth
    cfg = PreprocessConfig(shape=list(SHAPE), windows=WINDOWS, chunk_slices=2)
    store = create_store(path, volume_names=[f"train_{i}_a_1.nii.gz" for i in range(n)],
                         patient_ids=[f"train_{i}" for i in range(n)], labels=labels, label_names=LABEL_NAMES,
                         cfg=cfg)
    for row in range(n):
        hu = phantom(rng, bool(truth[row, METAL]), bool(truth[row, EMPHYSEMA]))
        images = windows_to_channels(hu.astype(np.float32), WINDOWS)
        if constant:
            images[:] = 128
        store.write_row(row, images, source=f"src{row}", info={})
    store.write_folds(rng.permutation(np.arange(n) % k), {"k": k, "seed": 0, "method": "test"})
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("floor")
    return {"visible": phantom_store(root / "visible.zarr"),
            "shuffled": phantom_store(root / "shuffled.zarr", shuffle=True, seed=1),
            "constant": phantom_store(root / "constant.zarr", constant=True)}


# ---------------------------------------------------------------------------------- features


def test_body_window_and_mask():
    windows = [{"name": w.name, "center": w.center, "width": w.width} for w in WINDOWS]
    assert body_window(windows) == (0, 144)  # lung window: -500 HU is grey 144
    no_air = [{"name": "mediastinum", "center": 40, "width": 400}, {"name": "bone", "center": 1000, "width": 2600}]
    assert body_window(no_air) == (1, 1)  # no window holds -500 HU: the one reaching lowest (bone, -300 HU)
    rng = np.random.default_rng(0)
    hu = phantom(rng, metal=False, emphysema=False)
    channel = windows_to_channels(hu.astype(np.float32), WINDOWS)[:, 0]
    mask = body_mask(channel, 144)
    yy, xx = np.mgrid[:32, :32]
    assert mask[:, 14, 10].all() and mask[:, 14, 22].all()  # the lungs are inside the body
    assert not mask[:, 30].any() and not mask[:, 0, 0].any()  # the table and the air are not
    assert mask[0].sum() == mask[-1].sum() > 0.3 * 32 * 32
    empty = body_mask(np.zeros((2, 8, 8), np.uint8), 144)
    assert empty.shape == (2, 8, 8) and not empty.any()


def test_volume_features_are_normalised_and_flag_constant_volumes():
    rng = np.random.default_rng(0)
    images = windows_to_channels(phantom(rng, True, False).astype(np.float32), WINDOWS)
    x, constant = volume_features(images, 0, 144)
    names = feature_names(["lung", "mediastinum"])
    assert x.shape == (len(names),) and not constant and np.isfinite(x).all()
    hist = x[: names.index("lung_mean")]
    assert hist.sum() == pytest.approx(1.0) and 0.3 < x[names.index("body_fraction")] < 0.8
    flat, constant = volume_features(np.full_like(images, 7), 0, 144)
    assert constant and not flat.any()  # all air: no body pixel, every feature 0


# ---------------------------------------------------------------------------------- the floor


def test_floor_learns_visible_findings(stores):
    floor = run_floor(stores["visible"])
    assert floor.per_label["Medical material"] >= 0.95 and floor.per_label["Emphysema"] >= 0.95
    assert floor.per_label["Cardiomegaly"] is None  # one class only: no AUROC, as in the challenge
    assert floor.verdict["at_chance"] is False and "above chance" in floor.verdict["message"]
    assert floor.probs.shape == floor.labels.shape == (48, len(LABEL_NAMES))
    assert sorted(np.unique(floor.folds)) == [0, 1, 2, 3] and floor.constant_volumes == 0
    assert list(floor.folds) == sorted(floor.folds)  # ordered by fold, like oof_predictions.csv


def test_constant_images_are_at_chance_and_named(stores):
    floor = run_floor(stores["constant"])
    assert floor.verdict["at_chance"] is True and floor.constant_volumes == 48 and floor.feature_spread == 0
    assert "at chance" in floor.verdict["message"] and "one grey level" in floor.verdict["message"]
    assert floor.auroc_macro is not None and floor.auroc_macro < 0.5 + chance_margin(floor.labels)


def test_shuffled_labels_are_at_chance(stores):
    floor = run_floor(stores["shuffled"])
    assert floor.verdict["at_chance"] is True, floor.verdict
    assert abs(floor.auroc_macro - 0.5) < 0.2
    assert "labels misaligned with rows" in floor.verdict["message"]


# ---------------------------------------------------------------------------------- the command


def test_cli_baseline_table_json_and_out(stores, tmp_path):
    result = runner.invoke(app, ["baseline", "--cache", str(stores["visible"])])
    assert result.exit_code == 0, result.output
    for text in ("floor AUROC", "Medical material", "Emphysema", "macro", "above chance", "n/a (one class)"):
        assert text in result.output, text
    data = json.loads(runner.invoke(app, ["baseline", "--cache", str(stores["visible"]), "--json"]).stdout)
    assert data["per_label"]["Medical material"] >= 0.95 and data["positives"]["Medical material"] == 24
    assert data["at_chance"] is False and data["folds"] == 4 and "LogisticRegression" in data["model"]
    run = tmp_path / "run"
    result = runner.invoke(app, ["baseline", "--cache", str(stores["visible"]), "--out", str(run)])
    assert result.exit_code == 0 and (run / "results" / FLOOR_JSON).is_file()
    header, rows = read_csv(run / "results" / "floor_oof_predictions.csv")
    assert header == ["VolumeName", "fold", *LABEL_NAMES] and len(rows) == 48


def test_cli_baseline_says_at_chance_and_refuses_bad_input(stores, tmp_path):
    result = runner.invoke(app, ["baseline", "--cache", str(stores["constant"])])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "at chance" in flat and "images carry no information" in flat
    result = runner.invoke(app, ["baseline", "--cache", str(stores["visible"]), "--folds", "3"])
    assert result.exit_code == 1 and "4 folds" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["baseline", "--cache", str(tmp_path / "nowhere.zarr")])
    assert result.exit_code == 1 and "no ctprep store" in result.stderr


# ---------------------------------------------------------------------------------- cv, summaries, report


def test_cv_writes_the_floor_and_below_floor(tmp_path):
    store = phantom_store(tmp_path / "s.zarr", n=16, k=2)
    run = tmp_path / "run"
    args = ["cv", "--cache", str(store), "--out", str(run), *(a for item in TINY for a in ("--set", item))]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "floor macro AUROC" in result.output
    results = run / "results"
    summary = json.loads((results / "cv_summary.json").read_text(encoding="utf-8"))
    detailed = json.loads((results / "cv_results_detailed.json").read_text(encoding="utf-8"))
    floor = summary["floor"]
    assert set(floor["per_label"]) == set(LABEL_NAMES) and floor["per_label"]["Cardiomegaly"] is None
    assert floor["per_label"]["Medical material"] > 0.5 and "LogisticRegression" in floor["model"]
    assert detailed["floor"] == floor and detailed["below_floor"] == summary["below_floor"]
    cnn = {label: stats["auroc"] for label, stats in detailed["oof"]["per_label"].items()}
    expected = [label for label in LABEL_NAMES if cnn[label] is not None and floor["per_label"][label] is not None
                and cnn[label] <= floor["per_label"][label]]
    assert summary["below_floor"] == expected
    for label in expected:  # the CLI names each label below the floor
        assert label in " ".join(result.output.split())
    header, rows = read_csv(results / "floor_oof_predictions.csv")
    oof_header, oof_rows = read_csv(results / "oof_predictions.csv")
    assert header == oof_header and sorted(r[:2] for r in rows) == sorted(r[:2] for r in oof_rows)


def _floor_block(per_label: dict[str, float | None]) -> dict:
    return {"auroc_macro": 0.7, "per_label": per_label, "model": "test floor", "at_chance": False,
            "message": "floor macro AUROC 0.70: above chance (>= 0.55); the CNN should beat it", "rule": "r", "n": 30}


def test_summarize_compares_with_the_floor_and_tolerates_old_runs(tmp_path):
    fake_fold_outputs(tmp_path, k=3)
    old = summarize(tmp_path, 3, method="f1")  # a run made before the floor: no floor.json
    assert old["floor"] is None and old["below_floor"] is None
    per_label = {label: 0.0 for label in LABEL_NAMES}
    per_label[LABEL_NAMES[2]], per_label[LABEL_NAMES[5]] = 0.999, None
    (tmp_path / "results" / FLOOR_JSON).write_text(json.dumps(_floor_block(per_label)), encoding="utf-8")
    summary = summarize(tmp_path, 3, method="f1")
    assert summary["below_floor"] == [LABEL_NAMES[2]] and summary["floor"]["model"] == "test floor"
    detailed = json.loads((tmp_path / "results" / "cv_results_detailed.json").read_text(encoding="utf-8"))
    lines = floor_lines(detailed)
    assert len(lines) == 2 and "above chance" in lines[0]
    assert "below the floor on 1 label" in lines[1] and f"{LABEL_NAMES[2]} (CNN 0." in lines[1]
    assert "<= floor 0.999" in lines[1]


def test_report_shows_the_floor(tmp_path):
    run = _fake_run(tmp_path)
    results = run / "results"
    with (results / "oof_labels.csv").open(newline="") as handle:
        y = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(handle))[1:]])
    summary = json.loads((results / "cv_summary.json").read_text(encoding="utf-8"))
    per_label = {label: (0.99 if j < 2 else 0.5) if y[:, j].any() else None for j, label in enumerate(LABEL_NAMES)}
    summary["floor"], summary["below_floor"] = _floor_block(per_label), LABEL_NAMES[:2]
    (results / "cv_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    make_report(run)
    text = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "floor AUROC | vs floor |" in text and "orange ticks: the sanity floor" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {LABEL_NAMES[0]} |"))
    assert "0.9900 | **below floor** |" in row
    assert f"below the floor on 2 of {sum(v is not None for v in per_label.values())} labels" in text
    assert (run / "report" / "auroc_by_label.png").stat().st_size > 20_000
