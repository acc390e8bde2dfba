"""bench/learning_curve.py's store views: nested training sets, the validation fold whole, the
store itself untouched, and cttrain seeing exactly the kept rows."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cttrain.reader import StoreReader, fold_rows

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from learning_curve import _sizes, make_view, training_subsets  # noqa: E402
from test_cv import tiny_store  # noqa: E402


def test_subsets_are_nested_patient_sets_with_the_whole_validation_fold():
    pids = [f"p{i // 2}" for i in range(40)]              # 20 patients, 2 volumes each
    folds = np.array([int(p[1:]) % 4 for p in pids])
    (n1, small), (n2, big), (n3, full) = training_subsets(pids, folds, fold=0, sizes=[3, 6, None])
    assert (n1, n2, n3) == (3, 6, 15)
    val = set(np.flatnonzero(folds == 0))
    for rows in (small, big, full):
        assert val <= set(rows)
    assert set(small) <= set(big) <= set(full)
    patients = {n: {pids[r] for r in rows if folds[r] != 0} for n, rows in ((3, small), (6, big), (15, full))}
    assert {n: len(v) for n, v in patients.items()} == {3: 3, 6: 6, 15: 15}
    # whole patients: both volumes of a kept patient are kept
    assert all(sum(pids[r] == p for r in small) == 2 for p in patients[3])


def test_view_clears_only_the_dropped_training_rows(tmp_path):
    store = tiny_store(tmp_path / "s.zarr", n=12, k=3)
    before = StoreReader(store).written.copy()
    keep = np.array([0, 3, 6, 9, 1])                      # fold 0 (rows 0, 3, 6, 9) + one training row
    view = tmp_path / "v.zarr"
    make_view(store, view, keep)
    assert np.array_equal(StoreReader(store).written, before)      # the store is not touched
    assert (view / "images").is_symlink() and not (view / "written").is_symlink()
    reader = StoreReader(view)
    train, val, skipped = fold_rows(reader, 0, 3)
    assert list(val) == [0, 3, 6, 9] and list(train) == [1] and skipped == 7
    assert np.array_equal(reader.read(1, np.arange(4)), StoreReader(store).read(1, np.arange(4)))


def test_sizes_are_positive_counts_or_all():
    import pytest


    assert _sizes("48, 96,all") == [48, 96, None]
    for bad in ("0", "4x", ""):
        with pytest.raises(SystemExit, match="--sizes"):
            _sizes(bad)
