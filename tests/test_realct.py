"""Reading and preprocessing real CT scans (../shared/realct), plus reading errors and DICOM repairs.

The real scans are not in the repository: their tests skip when ../shared/realct is absent. The
reading-error tests build their bad inputs in tmp_path and always run.
"""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ctprep.config import PreprocessConfig, Window
from ctprep.hu import VolumeMeta
from ctprep.io import VolumeReadError, read_notes, read_volume, source_fingerprint
from ctprep.pipeline import preprocess_image, preprocess_volume

REALCT = Path(__file__).resolve().parents[2] / "shared" / "realct"
SCANS = ["chest_ct_dicom", "abdomen_ct_dicom", "lungbase_3slice_dicom", "single_slice_no_modality_dicom",
         "chest_contrast_crop.nii.gz", "abdomen_int32.nii.gz"]
SMALL = PreprocessConfig(spacing=[5.0, 3.5, 3.5], shape=[32, 96, 96])
# grey = (hu + 1024) / 16 without CLAHE: reads HU back from the cached uint8 (16 HU resolution)
HU_READBACK = PreprocessConfig(spacing=[5.0, 3.5, 3.5], shape=[32, 96, 96], clahe_clip_limit=0.0,
                               windows=[Window("id", 1016.0, 4080.0)])
CTRATE_META = VolumeMeta(slope=1.0, intercept=-1024.0)

needs_realct = pytest.mark.skipif(not REALCT.is_dir(), reason=f"real CT samples not found at {REALCT}")


def _scan(name: str) -> Path:
    path = REALCT / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def chest() -> sitk.Image:
    """The 78 MB thorax DICOM series, read once for the module."""
    return read_volume(_scan("chest_ct_dicom"))


def _preprocess(name: str, cfg: PreprocessConfig, chest: sitk.Image | None = None):
    if name == "chest_ct_dicom" and chest is not None:
        return preprocess_image(chest, cfg)
    return preprocess_volume(_scan(name), cfg)


# ----------------------------------------------------------------------------------- real scans


@needs_realct
@pytest.mark.parametrize("name", SCANS)
def test_real_scan_preprocesses_to_plausible_hu(name, request):
    chest = request.getfixturevalue("chest") if name == "chest_ct_dicom" else None
    result = _preprocess(name, SMALL, chest)
    assert result.images.shape == (32, 3, 96, 96) and result.images.dtype == np.uint8
    stats = result.info["hu_stats"]
    assert result.info["hu_rule"] == "hu"
    assert -1050 <= stats["percentiles"]["p0.5"] <= -950          # air is about -1000 HU
    assert stats["fraction_air"] > 0.01
    hu = _preprocess(name, HU_READBACK, chest).images[:, 0].astype(float) * 16 - 1024
    soft = hu[(hu > -30) & (hu < 200)]
    assert 0 <= np.median(soft) <= 100                            # soft tissue, not fat or raw units
    assert not any(f.startswith("hu-") for f in result.info["qc_flags"])


@needs_realct
def test_dicom_rescale_is_applied_when_reading(chest):
    """chest_ct_dicom stores unsigned values with RescaleIntercept -1024: HU only after rescale."""
    stored = sitk.GetArrayViewFromImage(chest)
    assert int(stored.min()) == -1024 and int(stored.max()) == 2976


@needs_realct
def test_real_thorax_lung_window_shows_structure(chest):
    lung = preprocess_image(chest, SMALL).images[:, 0]
    depth = lung.shape[0]
    for z in range(depth // 2 - 3, depth // 2 + 4):              # slices through both lungs
        plane = lung[z]
        assert plane.std() > 20, f"slice {z} is flat"
        assert np.mean((plane == 0) | (plane == 255)) < 0.5, f"slice {z} is saturated"


@needs_realct
def test_v1_raw_and_v2_hu_encodings_of_a_real_scan_agree(chest):
    stored = sitk.GetArrayViewFromImage(chest)
    v1 = sitk.GetImageFromArray((stored.astype(np.int32) + 1024).astype(np.uint16))   # HU + 1024
    v1.CopyInformation(chest)
    raw = preprocess_image(v1, SMALL, CTRATE_META)
    hu = preprocess_image(chest, SMALL, CTRATE_META)
    assert raw.info["hu_rule"] == "raw-metadata" and hu.info["hu_rule"] == "hu"
    diff = np.abs(raw.images.astype(int) - hu.images.astype(int))
    assert np.mean(diff <= 2) >= 0.999
    # applying the CSV to the v2 volume anyway (the old pipeline's bug) is caught and loud
    forced = preprocess_image(chest, PreprocessConfig(**{**vars(SMALL), "hu_rule": "raw"}), CTRATE_META)
    assert "hu-no-soft-tissue" in forced.info["qc_flags"]
    assert np.mean(np.abs(forced.images.astype(int) - hu.images.astype(int)) <= 2) < 0.5


@needs_realct
def test_real_scan_with_flipped_axes_caches_the_same_image(chest):
    flipped = sitk.Flip(chest, [True, True, False])
    cosines = np.array(chest.GetDirection()).reshape(3, 3) * [-1, -1, 1]
    flipped.SetDirection(cosines.ravel().tolist())
    flipped.SetOrigin(chest.TransformIndexToPhysicalPoint([chest.GetSize()[0] - 1, chest.GetSize()[1] - 1, 0]))
    a, b = preprocess_image(chest, SMALL).images, preprocess_image(flipped, SMALL).images
    assert np.mean(np.abs(a.astype(int) - b.astype(int)) <= 1) >= 0.9999


@needs_realct
@pytest.mark.parametrize("name", ["chest_ct_dicom", "abdomen_int32.nii.gz"])
def test_spine_is_posterior_whatever_the_stored_direction(name, request):
    """LPS output: y grows towards posterior. abdomen_int32 is stored with direction diag(-1, -1, 1)."""
    chest = request.getfixturevalue("chest") if name == "chest_ct_dicom" else None
    cfg = PreprocessConfig(**{**vars(SMALL), "windows": [Window("bone", 700.0, 600.0)], "clahe_clip_limit": 0.0})
    bone = _preprocess(name, cfg, chest).images[:, 0] > 128
    rows = np.nonzero(bone)[1]
    assert rows.mean() > 96 / 2 + 5


@needs_realct
def test_int32_nifti_and_dicom_padding():
    abdomen = preprocess_volume(_scan("abdomen_int32.nii.gz"), SMALL)
    assert abdomen.info["source"]["dtype"] == "int32"
    path = _scan("lungbase_3slice_dicom")
    image = read_volume(path)
    assert image.GetSize() == (512, 512, 3)
    assert float(sitk.GetArrayViewFromImage(image).min()) == -3024            # padding, rescale applied
    as_air = sitk.Maximum(image, -1024)                                        # what clamping must give
    np.testing.assert_array_equal(preprocess_image(image, HU_READBACK).images,
                                  preprocess_image(as_air, HU_READBACK).images)


@needs_realct
def test_dicom_without_modality_tag_is_read_with_a_note():
    image = read_volume(_scan("single_slice_no_modality_dicom"))
    assert image.GetSize()[2] == 2
    assert any("Modality" in note for note in read_notes(image))


# ------------------------------------------------------------------------- reading (synthetic)


def _write(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=compress)
    return path


def _volume() -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, (12, 40, 48)).astype(np.int16)


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _expect_error(path: Path, reason: str) -> None:
    with pytest.raises(VolumeReadError) as info:
        read_volume(path)
    message = str(info.value)
    assert str(path) in message and reason in message
    assert "\n" not in message and ".cxx" not in message and "Exception thrown" not in message


def test_missing_and_empty_files(tmp_path):
    _expect_error(tmp_path / "missing.nii.gz", "no such file")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    _expect_error(empty, "empty file")


def test_files_that_are_not_images(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello", encoding="utf-8")
    _expect_error(text, "not a readable image")
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"not a nifti header" * 40))
    _expect_error(fake, "not a NIfTI")


@pytest.mark.parametrize("name", ["vol.nii.gz", "vol.nii"])
def test_truncated_nifti_is_refused_before_simpleitk_can_crash(tmp_path, name):
    path = _write(tmp_path / name, _volume(), compress=name.endswith(".gz"))
    assert read_volume(path).GetSize() == (48, 40, 12)
    _expect_error(_truncate(path), "truncated")


@pytest.mark.parametrize("name", ["vol.mha", "vol.nrrd"])
def test_truncated_other_formats_give_a_one_line_reason(tmp_path, name):
    path = _truncate(_write(tmp_path / name, _volume()))
    _expect_error(path, "cannot read the image data")


def test_2d_and_colour_images_are_not_volumes(tmp_path):
    _expect_error(_write(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.int16)), "2D image")
    rgb = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 3), np.uint8), isVector=True), str(rgb))
    _expect_error(rgb, "3-component")


def test_directory_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here", encoding="utf-8")
    _expect_error(tmp_path, "no DICOM series")


def _write_dicom_series(folder: Path, positions: list[float], modality: str | None = "CT") -> None:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.7"
    for i, z in enumerate(positions):
        plane = sitk.GetImageFromArray(np.full((16, 16), round(100 * z), np.int16))   # value = position
        plane.SetSpacing((0.7, 0.7))
        tags = {"0020|000e": series, "0020|000d": series + ".1", "0008|0018": f"{series}.2.{i + 1}",
                "0020|0032": f"0\\0\\{z}", "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(i + 1),
                "0008|0060": modality}
        for key, value in tags.items():
            if value is not None:
                plane.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{i}.dcm"))
        writer.Execute(plane)


def test_dicom_duplicate_positions_are_dropped_and_slices_sorted(tmp_path):
    folder = tmp_path / "series"
    _write_dicom_series(folder, [3.0, 0.0, 1.5, 1.5])
    image = read_volume(folder)
    assert image.GetSize() == (16, 16, 3)
    assert image.GetSpacing()[2] == pytest.approx(1.5)
    assert list(sitk.GetArrayViewFromImage(image)[:, 0, 0]) == [0, 150, 300]
    assert any("duplicate" in note for note in read_notes(image))


def test_non_ct_dicom_is_refused(tmp_path):
    folder = tmp_path / "mr"
    _write_dicom_series(folder, [0.0, 1.0], modality="MR")
    _expect_error(folder, "not CT")


def test_source_fingerprint_is_cheap_and_tracks_changes(tmp_path):
    path = _write(tmp_path / "vol.nii.gz", _volume())
    first = source_fingerprint(path)
    assert first == source_fingerprint(path)
    os.utime(path, ns=(1, 1))
    assert source_fingerprint(path) != first
    folder = tmp_path / "series"
    _write_dicom_series(folder, [0.0, 1.0])
    before = source_fingerprint(folder)
    (folder / "slice1.dcm").rename(folder / "renamed.dcm")
    assert source_fingerprint(folder) != before
    with pytest.raises(VolumeReadError, match="missing"):
        source_fingerprint(tmp_path / "missing.nii.gz")
