"""DICOM series are found by content, not by file name (issue 9, part 1).

Real exports name slices after their SOP Instance UID (`CT.1.3.12.2...`, no `.dcm`). The real scans
in ../shared/realct are found by name through `--data-dir`, the way a user calls build-cache.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from ctprep.cli import app
from ctprep.inputs import index_data_dir, is_dicom_file, resolve_volume
from ctprep.io import VolumeReadError, read_notes, read_volume
from ctprep.naming import LABEL_NAMES

REAL_NAMES = ["chest_ct_dicom", "abdomen_ct_dicom", "lungbase_3slice_dicom", "single_slice_no_modality_dicom",
              "chest_contrast_crop.nii.gz", "abdomen_int32.nii.gz"]


def _write_series(folder: Path, uid: str, n: int, name: str = "CT.{uid}.{i}") -> None:
    """`n` CT slices of one series, named like a PACS export (SOP Instance UID, no suffix)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")                                  # the name has no suffix to go by
    writer.KeepOriginalImageUIDOn()
    for i in range(n):
        plane = sitk.GetImageFromArray(np.full((16, 16), 10 * i, np.int16))
        plane.SetSpacing((0.7, 0.7))
        tags = {"0020|000e": uid, "0020|000d": uid + ".1", "0008|0018": f"{uid}.2.{i + 1}",
                "0020|0032": f"0\\0\\{1.5 * i}", "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(i + 1),
                "0008|0060": "CT"}
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(folder / name.format(uid=uid, i=i + 1)))
        writer.Execute(plane)


def test_uid_named_slices_are_found_by_content(tmp_path):
    _write_series(tmp_path / "data" / "case_7", "1.2.826.0.1.3680043.2.1125.9", 3)
    index = index_data_dir(tmp_path / "data")
    path, reason = resolve_volume(index, "case_7.nii.gz")
    assert reason is None and path == (tmp_path / "data" / "case_7").resolve()
    assert read_volume(path).GetSize() == (16, 16, 3)


def test_folder_without_dicom_content_is_not_a_series(tmp_path):
    folder = tmp_path / "data" / "notes"
    folder.mkdir(parents=True)
    (folder / "README").write_text("x" * 400, encoding="utf-8")      # no suffix, no DICM magic
    (folder / "scan.1.2.3").write_bytes(b"\0" * 128 + b"NOPE")
    assert not is_dicom_file(folder / "README") and not is_dicom_file(folder / "scan.1.2.3")
    path, reason = resolve_volume(index_data_dir(tmp_path / "data"), "notes")
    assert path is None and "no file for 'notes'" in reason


def test_mixed_folder_resolves_to_its_one_series(tmp_path):
    folder = tmp_path / "mixed"
    _write_series(folder, "1.2.826.0.1.3680043.2.1125.10", 4)
    (folder / "DICOMDIR.txt").write_text("export notes", encoding="utf-8")
    (folder / "thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    image = read_volume(folder)
    assert image.GetSize() == (16, 16, 4)
    assert any("not part of the series" in note for note in read_notes(image))


def test_two_series_in_one_folder_is_an_error_naming_both_uids(tmp_path):
    folder = tmp_path / "two"
    first, second = "1.2.826.0.1.3680043.2.1125.11", "1.2.826.0.1.3680043.2.1125.12"
    _write_series(folder, first, 3)
    _write_series(folder, second, 2)
    with pytest.raises(VolumeReadError) as info:
        read_volume(folder)
    message = str(info.value)
    assert first in message and second in message and "2 DICOM series" in message
    assert "\n" not in message


def _labels(path: Path, names: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["VolumeName", *LABEL_NAMES])
        for i, name in enumerate(names):
            writer.writerow([name, *((i + j) % 2 for j in range(len(LABEL_NAMES)))])
    return path


def test_every_real_scan_is_found_by_name_through_data_dir(realct):
    index = index_data_dir(realct)
    for name in REAL_NAMES:
        path, reason = resolve_volume(index, name)
        assert reason is None, reason
        assert path == (realct / name).resolve()


def test_build_cache_cli_caches_every_real_scan(realct, tmp_path):
    from ctprep.store import open_store

    config = tmp_path / "small.yaml"
    config.write_text("preprocess:\n  spacing: [6.0, 4.0, 4.0]\n  shape: [8, 48, 48]\n", encoding="utf-8")
    labels = _labels(tmp_path / "labels.csv", REAL_NAMES)
    out = tmp_path / "real.zarr"
    result = CliRunner().invoke(app, ["build-cache", "--data-dir", str(realct), "--labels", str(labels),
                                      "--out", str(out), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    store = open_store(out)
    assert store.written().all() and store.volume_names == REAL_NAMES
    files = [store.row_info(i)["file"] for i in range(store.n)]
    assert files == REAL_NAMES                                        # each found under its own name
    for row in range(store.n):
        assert store.read_images(row).std() > 5, REAL_NAMES[row]     # real content
