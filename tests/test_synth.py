"""Tests for `ctprep synth`: layout, CSVs, determinism, storage rules, HU plausibility and findings."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from ctprep.naming import LABEL_NAMES, parse_volume_name
from ctprep.synth import (
    SCALES,
    SynthError,
    make_recons,
    make_scans,
    recon_grid,
    render_hu,
    synthesize,
)
from ctprep.synth_anatomy import Scene, lung_inside
from ctprep.synth_findings import RENDERED
from ctprep.synth_geometry import ellipsoid_q

SEED = 7


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _read_volume(path: Path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def _volume_path(root: Path, name: str) -> Path:
    parsed = parse_volume_name(name)
    return root / "train" / parsed.patient_id / parsed.scan_id / name


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "dataset"
    return root, synthesize(root, patients=3, seed=SEED, v1_fraction=0.5, progress=False)


# ------------------------------------------------------------------------------------- layout, CSVs

def test_layout_and_csv_columns(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    labels_csv = root / "multi_abnormality_labels" / "train_predicted_labels.csv"
    metadata_csv = root / "metadata" / "train_metadata.csv"
    assert summary["labels_csv"] == str(labels_csv) and summary["metadata_csv"] == str(metadata_csv)
    with labels_csv.open() as f:
        assert next(csv.reader(f)) == ["VolumeName", *LABEL_NAMES]
    rows = _read_csv(labels_csv)
    names = [r["VolumeName"] for r in rows]
    assert len(names) == summary["volumes"] == len(set(names)) >= 3
    files = sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.nii.gz"))
    assert files == sorted(_volume_path(root, n).relative_to(root).as_posix() for n in names)
    assert all(re.fullmatch(r"train_\d+_[ab]_[12]\.nii\.gz", n) for n in names)
    assert {parse_volume_name(n).patient_id for n in names} == {"train_1", "train_2", "train_3"}
    assert all(r[label] in ("0", "1") for r in rows for label in LABEL_NAMES)
    assert summary["positives"] == {lab: sum(int(r[lab]) for r in rows) for lab in LABEL_NAMES}
    meta = _read_csv(metadata_csv)
    assert [m["VolumeName"] for m in meta] == names
    for column in ("XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope"):
        assert column in meta[0]
    assert all(re.fullmatch(r"\[(\d+\.?\d*), \1\]", m["XYSpacing"]) for m in meta)


def test_metadata_matches_nifti_geometry(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for meta in _read_csv(root / "metadata" / "train_metadata.csv"):
        image, _ = _read_volume(_volume_path(root, meta["VolumeName"]))
        xy = float(meta["XYSpacing"].strip("[]").split(",")[0])
        assert image.GetSpacing() == pytest.approx((xy, xy, float(meta["ZSpacing"])))
        origin = [float(v) for v in meta["ImagePositionPatient"].strip("[]").split(",")]
        assert image.GetOrigin() == pytest.approx(origin)
        assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))  # LPS, as SimpleITK writes
        assert image.GetSize() == (int(meta["Columns"]), int(meta["Rows"]), int(meta["NumberofSlices"]))
        assert (meta["RescaleIntercept"], meta["RescaleSlope"]) == ("-1024", "1")  # v1 and v2 alike


def test_v1_raw_and_v2_hu_storage(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    v1 = set(summary["v1_names"])
    names = [r["VolumeName"] for r in _read_csv(Path(summary["labels_csv"]))]
    assert v1 and v1 != set(names), "the fixture should hold both releases"
    assert summary["v1_volumes"] + summary["v2_volumes"] == len(names)
    for name in names:
        _, arr = _read_volume(_volume_path(root, name))
        assert arr.dtype == np.int16
        air = np.mean(arr <= (74 if name in v1 else -950))  # HU -950 is stored 74 in v1
        assert air > 0.05, name
        if name in v1:
            assert arr.min() >= 0, name
        else:
            assert arr.min() == -1024, name


def test_files_equal_render_hu(dataset: tuple[Path, dict]) -> None:
    """Voxels are a pure function of (seed, names): the file is render_hu (+1024 when v1)."""
    root, _ = dataset
    for scan in make_scans(SEED, 2):
        for recon in make_recons(scan, SEED, v1_fraction=0.5):
            _, arr = _read_volume(_volume_path(root, recon.name))
            np.testing.assert_array_equal(arr, render_hu(scan, recon) + (1024 if recon.raw else 0))


def test_same_seed_is_identical_in_parallel_and_other_seed_differs(dataset: tuple[Path, dict],
                                                                    tmp_path: Path) -> None:
    root, summary = dataset
    again = synthesize(tmp_path / "again", patients=3, seed=SEED, v1_fraction=0.5, progress=False, workers=2)
    for key in ("labels_csv", "metadata_csv"):
        assert Path(again[key]).read_bytes() == Path(summary[key]).read_bytes()
    for path in (root / "train").rglob("*.nii.gz"):
        np.testing.assert_array_equal(_read_volume(path)[1],
                                      _read_volume(tmp_path / "again" / path.relative_to(root))[1])
    other = make_scans(SEED + 1, 1)[0]
    first = make_scans(SEED, 1)[0]
    assert other.anatomy.a != first.anatomy.a
    a, b = render_hu(first, make_recons(first, SEED)[0]), render_hu(other, make_recons(other, SEED + 1)[0])
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_reconstructions_share_labels_and_scans_share_anatomy(dataset: tuple[Path, dict]) -> None:
    _, summary = dataset
    by_scan: dict[str, set[tuple[str, ...]]] = {}
    for row in _read_csv(Path(summary["labels_csv"])):
        scan_id = parse_volume_name(row["VolumeName"]).scan_id
        by_scan.setdefault(scan_id, set()).add(tuple(row[lab] for lab in LABEL_NAMES))
    assert all(len(rows) == 1 for rows in by_scan.values())
    two = next(scans for p in range(1, 30) if len(scans := make_scans(SEED, p)) == 2)
    assert two[0].anatomy is two[1].anatomy and two[0].findings is two[1].findings
    assert sum(a != b for a, b in zip(two[0].labels, two[1].labels, strict=True)) <= 6
    pairs = [rs for p in range(1, 30) for s in make_scans(SEED, p) if len(rs := make_recons(s, SEED)) == 2]
    assert pairs and all(a.slice_mm != b.slice_mm or a.noise_hu != b.noise_hu for a, b in pairs)


# ----------------------------------------------------------------------------------- generator rules

def test_grid_ranges_per_scale() -> None:
    for scale, ((n_lo, n_hi), (mm_lo, mm_hi), (nz_lo, nz_hi), (dz_lo, dz_hi)) in SCALES.items():
        for p in range(1, 8):
            for scan in make_scans(3, p, scale=scale):
                assert n_lo <= scan.pixels <= n_hi and mm_lo <= scan.pixel_mm <= mm_hi
                assert scan.pixels * scan.pixel_mm > 2 * scan.anatomy.a  # the body fits the field of view
                for recon in make_recons(scan, 3, scale=scale):
                    assert nz_lo <= recon.slices <= nz_hi and dz_lo <= recon.slice_mm <= dz_hi


def test_prevalence_and_label_restriction() -> None:
    scans = [s for p in range(1, 61) for s in make_scans(0, p)]
    prevalence = np.mean([s.labels for s in scans], axis=0)
    for i, name in enumerate(LABEL_NAMES):
        assert (0.05 < prevalence[i] < 0.6) if name in RENDERED else prevalence[i] == 0, name
    only = [s for p in range(1, 21) for s in make_scans(0, p, labels=["Lung nodule", "Emphysema"])]
    columns = np.array([s.labels for s in only]).sum(axis=0)
    assert {LABEL_NAMES[i] for i in np.nonzero(columns)[0]} == {"Lung nodule", "Emphysema"}


@pytest.mark.parametrize("kwargs", [{"patients": 0}, {"scale": "huge"}, {"v1_fraction": 1.5},
                                    {"labels": ["Not a label"]}])
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(SynthError):
        synthesize(tmp_path, **{"patients": 1, "progress": False, **kwargs})
    assert not (tmp_path / "train").exists()


def test_hu_plausibility_per_tissue() -> None:
    scan = make_scans(SEED, 1)[0]
    plain = dataclasses.replace(scan.contrast, phase="none", aorta=40.0, right_heart=40.0, myocardium=42.0)
    scan = dataclasses.replace(scan, labels=(0,) * len(LABEL_NAMES), contrast=plain)
    recon = make_recons(scan, SEED)[0]
    hu = render_hu(scan, recon).astype(np.float32)
    grid = recon_grid(scan, recon)[0]
    v = grid.view()
    scene = Scene(scan.anatomy, scan.contrast, scan.table)
    lung = np.broadcast_to(lung_inside(scene, v.x, v.y, v.z), hu.shape)
    assert np.mean(hu[lung] < -700) > 0.85 and -900 < np.median(hu[lung]) < -750
    c, r = scene.heart()
    heart = np.broadcast_to(ellipsoid_q(v, c, r, scan.anatomy.heart_angle) < 0.6, hu.shape)
    assert 0 < np.median(hu[heart]) < 100
    an = scan.anatomy
    outside = np.broadcast_to((v.x / an.a) ** 2 + (v.y / (an.b + 30)) ** 2 > 1.5, hu.shape)
    assert -1024 <= np.median(hu[outside]) < -970
    body = np.broadcast_to(v.x**2 + (v.y - an.y_spine) ** 2 < (an.spine_r - 4) ** 2, hu.shape)
    assert np.median(hu[body]) > 150  # vertebral bodies


# ----------------------------------------------------------------------------------------- findings

@pytest.fixture(scope="module")
def finding_pair():
    scan = make_scans(0, 2)[0]
    recon = dataclasses.replace(make_recons(scan, 0)[0], noise_hu=0.0)  # isolate the finding
    base = render_hu(dataclasses.replace(scan, labels=(0,) * len(LABEL_NAMES)), recon).astype(np.float32)
    return scan, recon, base


def _downsample(hu: np.ndarray, scan, recon) -> np.ndarray:
    """About the demo preprocessing: ~4 mm in-plane, 5 mm slices, linear interpolation."""
    from scipy.ndimage import zoom

    return zoom(hu, (recon.slice_mm / 5.0, scan.pixel_mm / 4.0, scan.pixel_mm / 4.0), order=1)


# Per finding: a check on the HU of the voxels it changed (with, diff) -> bool.
EXPECTED = {
    "Medical material": lambda v, d: v.max() >= 2000,
    "Arterial wall calcification": lambda v, d: v.max() >= 400,
    "Coronary artery wall calcification": lambda v, d: v.max() >= 400,
    "Cardiomegaly": lambda v, d: np.mean(d > 0) > 0.8 and -100 < np.median(v) < 200,
    "Pericardial effusion": lambda v, d: 0 <= np.median(v) <= 25,
    "Hiatal hernia": lambda v, d: v.min() < -850 and -50 < np.percentile(v, 75) < 80,
    "Lymphadenopathy": lambda v, d: 20 < np.median(v) < 90,
    "Emphysema": lambda v, d: np.median(v) < -940 and np.mean(d < 0) > 0.95,
    "Atelectasis": lambda v, d: -100 < np.percentile(v, 75) < 80,
    "Lung nodule": lambda v, d: -60 < np.percentile(v, 75) < 80,
    "Lung opacity": lambda v, d: -700 < np.median(v) < -400,
    "Pulmonary fibrotic sequela": lambda v, d: -200 < np.percentile(v, 75) < 60,
    "Pleural effusion": lambda v, d: 0 <= np.median(v) <= 30,
    "Mosaic attenuation pattern": lambda v, d: 0.2 < np.mean(d > 0) < 0.8,
    "Peribronchial thickening": lambda v, d: np.mean(d > 0) > 0.9 and -50 < np.percentile(v, 75) < 80,
    "Consolidation": lambda v, d: 10 < np.median(v) < 80,
    "Bronchiectasis": lambda v, d: np.percentile(v, 5) < -900,
    "Interlobular septal thickening": lambda v, d: -800 < np.median(v) < -500 and np.percentile(v, 75) > -450,
}


@pytest.mark.parametrize("name", list(RENDERED))
def test_each_finding_changes_voxels_in_its_hu_range(finding_pair, name: str) -> None:
    scan, recon, base = finding_pair
    flagged = dataclasses.replace(scan, labels=tuple(int(n == name) for n in LABEL_NAMES))
    hu = render_hu(flagged, recon).astype(np.float32)
    diff = hu - base
    changed = np.abs(diff) > 30
    assert changed.sum() > 40, f"{name} changed only {changed.sum()} voxels"
    assert EXPECTED[name](hu[changed], diff[changed]), name
    # still visible after resampling to demo resolution
    assert np.abs(_downsample(hu, scan, recon) - _downsample(base, scan, recon)).max() > 200, name


def test_every_label_is_rendered_or_documented() -> None:
    assert set(RENDERED) <= set(LABEL_NAMES) and set(EXPECTED) == set(RENDERED)
    assert all(0.15 <= p <= 0.4 for p in RENDERED.values())
