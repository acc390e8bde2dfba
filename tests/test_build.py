"""build-cache orchestration: store contents, file discovery, CSV rules, config/row checks, overwrite.

The helpers at the top are shared with test_build_badinput.py and test_build_resume.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctprep.build import BuildError, build_cache, parse_shard, print_report
from ctprep.config import PreprocessConfig
from ctprep.naming import LABEL_NAMES

REPO = Path(__file__).resolve().parents[1]


def small_cfg(**changes) -> PreprocessConfig:
    return PreprocessConfig(shape=[8, 32, 32], spacing=[4.0, 3.0, 3.0], **changes)


def write_volume(path: Path, seed: int, shape: tuple[int, int, int] = (20, 40, 40), constant: bool = False) -> Path:
    """A small int16 HU chest phantom: air, a body ellipse, two lungs, a lesion and noise."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    d, h, w = shape
    _, y, x = np.mgrid[0:d, 0:h, 0:w].astype(np.float32)
    arr = np.full(shape, -1000.0, dtype=np.float32)
    if not constant:
        arr[((y - h / 2) / (0.42 * h)) ** 2 + ((x - w / 2) / (0.45 * w)) ** 2 < 1] = 40.0
        for cx in (0.3 * w, 0.7 * w):
            arr[((y - h / 2) / (0.3 * h)) ** 2 + ((x - cx) / (0.15 * w)) ** 2 < 1] = -850.0
        cz, cy, cx = rng.uniform(0.3, 0.7, 3) * shape
        z = np.arange(d, dtype=np.float32)[:, None, None]
        arr[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < 9] = 60.0
        arr += rng.normal(0, 15, shape)
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing((1.5, 1.5, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def ctrate_path(root: Path, name: str) -> Path:
    """CT-RATE nested layout: train/train_1/train_1_a/train_1_a_1.nii.gz."""
    split, pid, scan, _ = name.split(".")[0].split("_")
    return root / split / f"{split}_{pid}" / f"{split}_{pid}_{scan}" / name


def label_values(i: int) -> list[int]:
    return [int(v) for v in np.random.default_rng(100 + i).integers(0, 2, len(LABEL_NAMES))]


def write_labels(path: Path, rows: list[tuple[str, list]], header: list[str] | None = None) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header or ["VolumeName", *LABEL_NAMES])
        for name, values in rows:
            writer.writerow([name, *values])
    return path


def make_dataset(root: Path, names: list[str]) -> tuple[Path, Path]:
    """Volumes in the CT-RATE layout under root/data and a labels CSV; returns (data_dir, csv)."""
    data = root / "data"
    for i, name in enumerate(names):
        write_volume(ctrate_path(data, name), seed=i)
    csv_path = write_labels(root / "labels.csv", [(n, label_values(i)) for i, n in enumerate(names)])
    return data, csv_path


NAMES = ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_a_1.nii.gz", "train_3_b_1.nii.gz"]


def store_snapshot(path: Path) -> dict:
    """Every array and the group attrs, for comparing two stores."""
    import zarr

    g = zarr.open_group(str(path), mode="r")
    out = {"attrs": dict(g.attrs)}
    for name in ("images", "labels", "folds", "written", "source", "row_info"):
        out[name] = np.asarray(g[name][:])
    return out


def _without_timings(row_info: np.ndarray) -> list:
    """Row infos minus the pipeline's wall-clock timings (the only part that may differ run to run)."""
    out = []
    for text in row_info:
        info = json.loads(str(text)) if str(text) else {}
        info.pop("timings", None)
        out.append(info)
    return out


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = store_snapshot(a), store_snapshot(b)
    assert sa["attrs"] == sb["attrs"]
    for name in ("images", "labels", "folds", "written", "source"):
        assert np.array_equal(sa[name], sb[name]), name
    assert _without_timings(sa["row_info"]) == _without_timings(sb["row_info"])


def tree_state(path: Path) -> dict[str, tuple[int, str]]:
    """mtime_ns and content hash of every file under path."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            out[str(p.relative_to(path))] = (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


# ------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    data, labels = make_dataset(root, NAMES)
    report = build_cache(data, labels, root / "cache" / "s.zarr", small_cfg(), progress=False)
    return root, data, labels, report


def test_happy_path_store_contents(built):
    from ctprep.store import SCHEMA, fingerprint, open_store

    root, _data, _labels, report = built
    assert report.ok and report.written_now == 4 and report.already_done == 0 and report.rows == 4
    store = open_store(root / "cache" / "s.zarr")
    assert store.attrs["schema"] == SCHEMA
    assert store.volume_names == NAMES                                 # CSV order
    assert store.patient_ids == ["train_1", "train_1", "train_2", "train_3"]
    assert store.label_names == list(LABEL_NAMES)
    assert store.labels().tolist() == [label_values(i) for i in range(4)]
    assert store.fingerprint == fingerprint(small_cfg())
    assert store.written().all()
    assert store.image_shape == (8, 3, 32, 32)
    for row in range(4):
        img = store.read_images(row)
        assert img.std() > 5                                           # real content, not constant
        info = store.row_info(row)
        assert info["file"] == str(Path(ctrate_path(Path("."), NAMES[row])))
        assert "hu_rule" in info
    assert not np.array_equal(store.read_images(0), store.read_images(2))
    saved = json.loads((root / "cache" / "s.zarr.failures.json").read_text(encoding="utf-8"))
    assert saved == {"store": str(root / "cache" / "s.zarr"), "shard": [0, 1], "failures": [],
                     "warnings": [], "qc_flagged": []}


def test_print_report_shows_summary(built):
    from rich.console import Console

    console = Console(record=True, width=200, file=io.StringIO())
    print_report(built[3], console)
    text = console.export_text()
    for word in ("rows", "written now", "already done", "failed", "qc flagged", "volumes/s", "store size"):
        assert word in text


def test_finds_by_stem_flat_layout_and_dicom_directory(tmp_path, realct):
    data = tmp_path / "data"
    write_volume(data / "x.mha", 1)                                    # CSV says x.nii.gz
    write_volume(data / "sub" / "y.nrrd", 2)
    shutil.copytree(realct / "lungbase_3slice_dicom", data / "chest")  # CSV says chest.nii.gz
    labels = write_labels(tmp_path / "l.csv", [("x.nii.gz", label_values(0)), ("y", label_values(1)),
                                               ("chest.nii.gz", label_values(2))])
    report = build_cache(data, labels, tmp_path / "s.zarr", small_cfg(), progress=False)
    assert report.ok, report.failures
    from ctprep.store import open_store

    store = open_store(tmp_path / "s.zarr")
    assert store.written().all()
    assert [store.row_info(i)["file"] for i in range(3)] == ["x.mha", "sub/y.nrrd", "chest"]
    assert store.patient_ids == ["x", "y", "chest"]


def test_exact_name_wins_and_ambiguity_is_reported(tmp_path):
    data = tmp_path / "data"
    write_volume(data / "x.nii.gz", 1)
    write_volume(data / "x.mha", 2)
    write_volume(data / "a" / "z.nii.gz", 3)
    write_volume(data / "b" / "z.nii.gz", 4)
    labels = write_labels(tmp_path / "l.csv", [("x.mha", label_values(0)), ("z.nii.gz", label_values(1))])
    report = build_cache(data, labels, tmp_path / "s.zarr", small_cfg(), progress=False)
    from ctprep.store import open_store

    assert open_store(tmp_path / "s.zarr").row_info(0)["file"] == "x.mha"
    [fail] = report.failures
    assert fail["volume"] == "z.nii.gz" and fail["stage"] == "find"
    assert "ambiguous" in fail["reason"] and "a/z.nii.gz" in fail["reason"] and "b/z.nii.gz" in fail["reason"]


def test_files_without_rows_are_a_warning(tmp_path):
    data, _ = make_dataset(tmp_path, NAMES[:2])
    for i in range(7):
        write_volume(data / "extra" / f"extra_{i}.nii.gz", i)
    labels = write_labels(tmp_path / "l.csv", [(NAMES[0], label_values(0)), (NAMES[1], label_values(1))])
    report = build_cache(data, labels, tmp_path / "s.zarr", small_cfg(), progress=False)
    assert report.ok and report.rows == 2
    [warning] = report.warnings
    assert warning.startswith("7 volume file(s)") and "extra/extra_0.nii.gz" in warning and "..." in warning


def test_label_columns_follow_the_csv_header(tmp_path):
    data, _ = make_dataset(tmp_path, NAMES[:2])
    header = ["VolumeName", "Index", "Emphysema", "Cardiomegaly"]
    labels = write_labels(tmp_path / "l.csv", [(NAMES[0], [7, 1, 0]), (NAMES[1], [8, 0, 1])], header)
    report = build_cache(data, labels, tmp_path / "s.zarr", small_cfg(), progress=False)
    from ctprep.store import open_store

    store = open_store(tmp_path / "s.zarr")
    assert store.label_names == ["Emphysema", "Cardiomegaly"]          # CSV order, known labels only
    assert store.labels().tolist() == [[1, 0], [0, 1]]
    assert any("'Index'" in w for w in report.warnings)


@pytest.mark.parametrize("header, match", [
    (["Name", *LABEL_NAMES], "no 'VolumeName' column"),
    (["VolumeName"], "no label columns"),
])
def test_unusable_labels_csv_is_rejected(tmp_path, header, match):
    labels = write_labels(tmp_path / "l.csv", [], header)
    (tmp_path / "data").mkdir()
    with pytest.raises(BuildError, match=match):
        build_cache(tmp_path / "data", labels, tmp_path / "s.zarr", small_cfg(), progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 3/4 ") == (3, 4)
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(BuildError, match="shard"):
            parse_shard(bad)


def test_config_change_is_refused_naming_keys_and_store_untouched(built, tmp_path):
    root, data, labels, _ = built
    store = tmp_path / "s.zarr"
    shutil.copytree(root / "cache" / "s.zarr", store)
    before = tree_state(store)
    with pytest.raises(BuildError) as exc:
        build_cache(data, labels, store, small_cfg(clahe_tiles=4, air_hu=-1000.0), progress=False)
    assert "preprocess.clahe_tiles: 8 -> 4" in str(exc.value) and "preprocess.air_hu" in str(exc.value)
    assert "--overwrite" in str(exc.value)
    assert tree_state(store) == before


def test_changed_rows_or_labels_are_refused(built, tmp_path):
    root, data, _labels, _ = built
    store = tmp_path / "s.zarr"
    shutil.copytree(root / "cache" / "s.zarr", store)
    before = tree_state(store)
    fewer = write_labels(tmp_path / "fewer.csv", [(n, label_values(i)) for i, n in enumerate(NAMES[:3])])
    with pytest.raises(BuildError, match="other rows than the labels CSV"):
        build_cache(data, fewer, store, small_cfg(), progress=False)
    flipped = [(n, label_values(i)) for i, n in enumerate(NAMES)]
    flipped[1][1][0] = 1 - flipped[1][1][0]
    relabeled = write_labels(tmp_path / "relabeled.csv", flipped)
    with pytest.raises(BuildError, match=f"labels changed for 1 row.*{NAMES[1]}"):
        build_cache(data, relabeled, store, small_cfg(), progress=False)
    assert tree_state(store) == before


def test_overwrite_rebuilds_and_a_rejected_overwrite_keeps_the_old_store(built, tmp_path):
    from ctprep.store import fingerprint, open_store

    root, data, labels, _ = built
    store = tmp_path / "s.zarr"
    shutil.copytree(root / "cache" / "s.zarr", store)
    before = tree_state(store)
    bad_csv = write_labels(tmp_path / "bad.csv", [], ["Name"])
    with pytest.raises(BuildError):
        build_cache(data, bad_csv, store, small_cfg(clahe_tiles=4), overwrite=True, progress=False)
    with pytest.raises(BuildError, match="--overwrite cannot be combined with --shard"):
        build_cache(data, labels, store, small_cfg(clahe_tiles=4), overwrite=True, shard=(0, 2), progress=False)
    assert tree_state(store) == before
    shutil.copytree(store, tmp_path / "s.zarr.overwrite-tmp")   # a stale temp with another config
    report = build_cache(data, labels, store, small_cfg(clahe_tiles=4), overwrite=True, progress=False)
    assert report.ok and report.written_now == 4
    assert open_store(store).fingerprint == fingerprint(small_cfg(clahe_tiles=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "s.zarr", "s.zarr.failures.json", "s.zarr.lock"]


def test_overwrite_keeps_the_old_store_when_the_new_one_is_less_complete(built, tmp_path):
    from ctprep.store import open_store

    root, _data, labels, _ = built
    store = tmp_path / "s.zarr"
    shutil.copytree(root / "cache" / "s.zarr", store)
    (tmp_path / "empty").mkdir()
    report = build_cache(tmp_path / "empty", labels, store, small_cfg(clahe_tiles=4), overwrite=True,
                         progress=False)
    assert not report.ok and len(report.failures) == 4
    assert any("the old store is kept" in w for w in report.warnings)
    assert open_store(store).written().all()


def test_refuses_to_write_into_a_foreign_directory(tmp_path):
    data, labels = make_dataset(tmp_path, NAMES[:1])
    out = tmp_path / "notastore"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    for overwrite in (False, True):
        with pytest.raises(BuildError, match="not a zarr store"):
            build_cache(data, labels, out, small_cfg(), overwrite=overwrite, progress=False)
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path):
    from rich.console import Console

    data, labels = make_dataset(tmp_path, NAMES[:2])
    buffer = io.StringIO()
    report = build_cache(data, labels, tmp_path / "s.zarr", small_cfg(), progress=True,
                         console=Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert report.ok
    assert "build-cache: 2 volume(s) to build, 0 already done" in text
    assert "build-cache 2/2 volumes" in text and "vol/s" in text and "\x1b[" not in text


def test_interrupted_overwrite_swap_is_finished_on_the_next_run(built, tmp_path):
    from ctprep.store import fingerprint, open_store

    root, data, labels, _ = built
    out = tmp_path / "s.zarr"
    shutil.copytree(root / "cache" / "s.zarr", tmp_path / "s.zarr.old-tmp")      # state after the 1st rename
    build_cache(data, labels, tmp_path / "new.zarr", small_cfg(clahe_tiles=4), progress=False)
    (tmp_path / "new.zarr").rename(tmp_path / "s.zarr.overwrite-tmp")
    report = build_cache(data, labels, out, small_cfg(clahe_tiles=4), progress=False)
    assert report.ok and report.already_done == 4 and report.written_now == 0
    assert open_store(out).fingerprint == fingerprint(small_cfg(clahe_tiles=4))
    assert not (tmp_path / "s.zarr.old-tmp").exists() and not (tmp_path / "s.zarr.overwrite-tmp").exists()


def test_store_inside_the_data_dir_is_not_indexed(tmp_path):
    from ctprep.inputs import index_data_dir

    data, labels = make_dataset(tmp_path, NAMES[:2])
    first = build_cache(data, labels, data / "cache" / "s.zarr", small_cfg(), progress=False)
    again = build_cache(data, labels, data / "cache" / "s.zarr", small_cfg(), progress=False)
    assert first.ok and again.ok and again.already_done == 2 and not again.warnings
    assert not any("cache" in str(c.path) for cands in index_data_dir(data).by_key.values() for c in cands)


def test_two_stores_in_one_folder_keep_their_own_side_files(tmp_path):
    from ctprep.folds import make_folds
    from ctprep.info import store_info

    data = tmp_path / "data"
    write_volume(data / "a.nii.gz", 1)
    write_volume(data / "b.nii.gz", 2)
    cache = tmp_path / "cache"
    first = build_cache(data, write_labels(tmp_path / "one.csv", [("a.nii.gz", label_values(0)),
                                                                   ("missing.nii.gz", label_values(1))]),
                        cache / "one.zarr", small_cfg(), progress=False)
    second = build_cache(data, write_labels(tmp_path / "two.csv", [("b.nii.gz", label_values(2))]),
                         cache / "two.zarr", small_cfg(), progress=False)
    assert not first.ok and second.ok
    one = json.loads((cache / "one.zarr.failures.json").read_text(encoding="utf-8"))
    two = json.loads((cache / "two.zarr.failures.json").read_text(encoding="utf-8"))
    assert [f["volume"] for f in one["failures"]] == ["missing.nii.gz"]   # not overwritten by the 2nd build
    assert two["failures"] == [] and two["store"] == str(cache / "two.zarr")
    assert not (cache / "failures.json").exists()
    make_folds(cache / "two.zarr", k=2, seed=0, from_file=_fold_csv(tmp_path, ["b.nii.gz"]))
    sides = store_info(cache / "two.zarr")["side_files"]
    assert sides["failures"] == {"path": str(cache / "two.zarr.failures.json"), "exists": True}
    assert sides["folds"] == {"path": str(cache / "two.zarr.folds.json"), "exists": True}
    assert store_info(cache / "one.zarr")["side_files"]["folds"]["exists"] is False


def _fold_csv(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "folds.csv"
    path.write_text("VolumeName,fold\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)), encoding="utf-8")
    return path
