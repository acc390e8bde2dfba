import json

import numpy as np
import pytest

from ctprep.config import PreprocessConfig
from ctprep.store import (
    SCHEMA,
    StoreError,
    chunk_depth,
    clean_stale_temp_files,
    config_diff,
    create_store,
    fingerprint,
    open_store,
)

CFG = PreprocessConfig(spacing=[4.0, 3.0, 3.0], shape=[8, 16, 16], chunk_slices=4)
LABELS = ["a", "b", "c"]


def _store(path, n=3, cfg=CFG):
    labels = np.eye(n, len(LABELS), dtype=np.uint8)
    names = [f"train_{i}_a_1.nii.gz" for i in range(n)]
    return create_store(path, volume_names=names, patient_ids=[f"train_{i}" for i in range(n)],
                        labels=labels, label_names=LABELS, cfg=cfg)


def test_schema_matches_the_design_contract(tmp_path):
    import zarr

    _store(tmp_path / "s.zarr")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g.attrs["schema"] == SCHEMA == "ctprep-cache/1"
    assert g["images"].shape == (3, 8, 3, 16, 16) and g["images"].dtype == np.uint8
    assert g["images"].chunks == (1, 4, 3, 16, 16)
    assert g["images"].shards == (1, 8, 3, 16, 16)           # one shard per volume
    assert g["labels"].dtype == np.uint8 and g["labels"].shape == (3, 3)
    assert g["folds"].dtype == np.int8 and (g["folds"][:] == -1).all()
    assert g["written"].dtype == bool and g["written"].chunks == (1,)
    assert [w["name"] for w in g.attrs["windows"]] == ["lung", "mediastinum", "wide"]
    assert g.attrs["patient_ids"] == ["train_0", "train_1", "train_2"]
    assert g.attrs["label_names"] == LABELS
    assert g.attrs["fingerprint"] == fingerprint(CFG)
    assert g.attrs["preprocess"]["shape"] == [8, 16, 16]


def test_write_row_verifies_then_flags(tmp_path):
    s = _store(tmp_path / "s.zarr")
    img = np.random.default_rng(0).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8)
    s.write_row(1, img, "src-fp", {"hu_rule": "hu"})
    r = open_store(tmp_path / "s.zarr")
    assert r.written().tolist() == [False, True, False]
    assert np.array_equal(r.read_images(1), img)
    assert np.array_equal(r.read_images(1, [2, 5], [0]), img[[2, 5]][:, [0]])
    assert r.sources()[1] == "src-fp" and r.row_info(1) == {"hu_rule": "hu"}
    with pytest.raises(StoreError, match="shape"):
        s.write_row(0, img[:4], "x", {})
    assert not open_store(tmp_path / "s.zarr").written()[0]


def test_refuses_non_stores_with_a_clear_message(tmp_path):
    with pytest.raises(StoreError, match="no ctprep store"):
        open_store(tmp_path / "missing.zarr")
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["schema"] = "something/9"
    with pytest.raises(StoreError, match="not 'ctprep-cache/1'"):
        open_store(tmp_path / "other.zarr")


def test_create_refuses_to_clobber(tmp_path):
    _store(tmp_path / "s.zarr")
    with pytest.raises(Exception):  # noqa: B017 - zarr's ContainsGroupError
        _store(tmp_path / "s.zarr")


def test_fingerprint_and_diff_follow_the_config():
    other = PreprocessConfig(spacing=[4.0, 3.0, 3.0], shape=[8, 16, 16], chunk_slices=4, clahe_tiles=4)
    assert fingerprint(CFG) == fingerprint(PreprocessConfig(spacing=[4.0, 3.0, 3.0], shape=[8, 16, 16]))
    assert fingerprint(CFG) != fingerprint(other)
    from ctprep.config import to_dict

    assert config_diff(to_dict(CFG), to_dict(other)) == ["preprocess.clahe_tiles: 8 -> 4"]


def test_chunk_depth_divides_depth():
    assert chunk_depth(96, 4) == 4
    assert chunk_depth(30, 4) == 3
    assert chunk_depth(7, 4) == 1
    assert chunk_depth(2, 4) == 2


def test_write_folds_and_stale_temp_cleanup(tmp_path):
    s = _store(tmp_path / "s.zarr")
    s.write_folds(np.array([0, 1, 0]), {"k": 2})
    r = open_store(tmp_path / "s.zarr")
    assert r.folds().tolist() == [0, 1, 0] and r.attrs["folds"] == {"k": 2}
    stale = tmp_path / "s.zarr" / "images" / "c" / "x.1234.partial"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"torn")
    assert clean_stale_temp_files(tmp_path / "s.zarr") == 1 and not stale.exists()
    json.loads((tmp_path / "s.zarr" / "zarr.json").read_text(encoding="utf-8"))  # group metadata still valid
