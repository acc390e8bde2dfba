"""`ctprep synth --anatomy`: findings painted onto real chest CT (../shared/realct, skipped when absent).

What is checked: the background analysis finds the structures findings are placed by; every
painter changes voxels, only its own label's, at the HU its documentation states; a scan with no
label drawn is the background untouched; labels are exactly what was painted and visible; the
data set is deterministic per seed; a background without lungs is refused with a clear error.
"""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from typer.testing import CliRunner

from ctprep.cli import app
from ctprep.naming import LABEL_NAMES
from ctprep.synth import synthesize
from ctprep.synth_real import AnatomyError, analyse, load_background
from ctprep.synth_real_scan import (
    PAINTERS,
    final_labels,
    make_real_recons,
    make_real_scans,
    paint_scan,
    render_recon,
)

# What each finding paints (the HU its docstring promises, before noise and resampling).
HU_RANGE = {
    "Pleural effusion": (-20, 40), "Consolidation": (0, 110), "Emphysema": (-1024, -940),
    "Lung nodule": (15, 50), "Lymphadenopathy": (30, 85), "Pericardial effusion": (5, 20),
    "Medical material": (700, 3000), "Arterial wall calcification": (400, 1000),
    "Coronary artery wall calcification": (350, 900), "Bronchiectasis": (-1000, 40),
    "Pulmonary fibrotic sequela": (-80, 30), "Atelectasis": (-80, 30),
}


@pytest.fixture(scope="module")
def chest(realct):
    return load_background(str(realct / "chest_ct_dicom"))


def _scan_with(chest, label: str | None, patient: int = 3):
    scan = make_real_scans(5, patient, [chest.source])[0]
    drawn = tuple(int(name == label) for name in LABEL_NAMES)
    return dataclasses.replace(scan, drawn=drawn)


def test_background_structures(chest) -> None:
    assert not chest.cropped and not chest.contrast
    lung_l = (chest.lung == 1).sum() * np.prod(chest.spacing) / 1e6
    lung_r = (chest.lung == 2).sum() * np.prod(chest.spacing) / 1e6
    assert 1.0 < lung_l < 5.0 and 1.0 < lung_r < 5.0  # litres per side
    heart = chest.heart.sum() * np.prod(chest.spacing) / 1e3
    assert 300 < heart < 1500  # ml
    z, y, x = chest.carina
    assert chest.lung_z[0] < z < chest.lung_z[1] and chest.airway[z - 2: z + 3].any()
    assert np.isfinite(chest.aorta[:, 0]).mean() > 0.3
    # the heart lies between the lungs, in front of the spine
    hz, hy, hx = np.argwhere(chest.heart).mean(axis=0)
    assert hy < np.nanmean(chest.spine[:, 0]) and abs(hx - chest.mid_x[int(hz)]) < 60 / chest.spacing[2]


def test_cropped_contrast_background_loads(realct) -> None:
    crop = load_background(str(realct / "chest_contrast_crop.nii.gz"))
    assert crop.cropped and crop.contrast and crop.lungs.any()


def test_no_finding_leaves_the_background_untouched(chest) -> None:
    cv = paint_scan(chest, _scan_with(chest, None), seed=5)
    assert np.array_equal(cv.vol, chest.hu) and not cv.painted


@pytest.mark.parametrize("label", list(PAINTERS))
def test_each_painter_changes_only_its_label_at_its_hu(chest, label: str) -> None:
    scan = _scan_with(chest, label)
    cv = paint_scan(chest, scan, seed=5)
    assert set(cv.painted) == {label} and cv.painted[label].sum() > 0
    changed = cv.vol != chest.hu
    assert changed.any()
    if label in HU_RANGE:
        lo, hi = HU_RANGE[label]
        values = cv.vol[changed]
        inside = (values >= lo - 15) & (values <= hi + 15)  # noise of a few HU on fluid
        assert inside.mean() > 0.95, f"{label}: {np.percentile(values, [1, 50, 99])}"
    recon = make_real_recons(scan, 5, scale="tiny")[0]
    _, grid = render_recon(cv, scan, recon, 64)
    assert final_labels(cv, scan, grid)[LABEL_NAMES.index(label)] == 1


def test_dataset_is_deterministic_and_labels_are_what_was_painted(chest, tmp_path) -> None:
    kwargs = {"patients": 2, "seed": 11, "scale": "tiny", "progress": False, "anatomy": [chest.source]}
    a = synthesize(tmp_path / "a", workers=1, **kwargs)
    b = synthesize(tmp_path / "b", workers=2, **kwargs)
    assert a["volumes"] == b["volumes"] >= 2
    for rel in ("multi_abnormality_labels/train_predicted_labels.csv", "metadata/train_metadata.csv"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    import SimpleITK as sitk

    first = sorted((tmp_path / "a").rglob("*.nii.gz"))[0]
    twin = tmp_path / "b" / first.relative_to(tmp_path / "a")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(first))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(twin))))
    with (tmp_path / "a" / "multi_abnormality_labels" / "train_predicted_labels.csv").open() as handle:
        rows = {r["VolumeName"]: tuple(int(r[n]) for n in LABEL_NAMES) for r in csv.DictReader(handle)}
    scan = make_real_scans(11, 1, [chest.source])[0]
    cv = paint_scan(chest, scan, 11)
    recon = make_real_recons(scan, 11, scale="tiny")[0]
    _, grid = render_recon(cv, scan, recon, 96)
    assert rows[recon.name] == final_labels(cv, scan, grid)
    assert all(d >= f for d, f in zip(scan.drawn, rows[recon.name], strict=True))  # never a label not drawn


def test_background_without_lungs_is_refused() -> None:
    hu = np.full((20, 64, 64), -1000.0, np.float32)
    hu[:, 10:54, 10:54] = 40.0  # a block of soft tissue: no lungs
    with pytest.raises(AnatomyError, match="no lungs"):
        analyse(hu, (2.0, 1.5, 1.5), (0.0, 0.0, 0.0), source="block.nii.gz")


def test_cli_missing_anatomy_is_one_line(tmp_path) -> None:
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "o"), "--patients", "1", "--anatomy",
                                      str(tmp_path / "missing.nii.gz")])
    assert result.exit_code == 2 and "missing.nii.gz" in result.output and "Traceback" not in result.output
