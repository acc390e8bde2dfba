import json

import numpy as np
import pytest

from ctprep.config import PreprocessConfig
from ctprep.folds import (
    FoldError,
    assign_folds,
    check_patient_disjoint,
    fold_table,
    folds_from_file,
    make_folds,
    patient_label_union,
)
from ctprep.store import create_store, open_store


def _dataset(n_patients=150, seed=0, n_labels=6):
    rng = np.random.default_rng(seed)
    names, pids, labels = [], [], []
    for p in range(n_patients):
        base = (rng.random(n_labels) < np.linspace(0.08, 0.5, n_labels)).astype(np.uint8)
        for scan in "ab"[: rng.integers(1, 3)]:
            for recon in range(1, rng.integers(2, 4)):
                names.append(f"train_{p}_{scan}_{recon}.nii.gz")
                pids.append(f"train_{p}")
                labels.append(base)
    return names, pids, np.array(labels)


def test_patient_union_is_the_or_of_volumes():
    pids, union = patient_label_union(["p1", "p1", "p2"], np.array([[1, 0], [0, 1], [0, 0]]))
    assert pids == ["p1", "p2"] and union.tolist() == [[1, 1], [0, 0]]


def test_folds_are_patient_disjoint_complete_and_balanced():
    names, pids, labels = _dataset()
    folds = assign_folds(pids, labels, k=5, seed=1)
    assert set(folds.tolist()) == {0, 1, 2, 3, 4}                    # every volume assigned
    check_patient_disjoint(pids, folds, names)                       # no leak
    by_patient = {}
    for p, f in zip(pids, folds, strict=True):
        assert by_patient.setdefault(p, f) == f
    table = fold_table(folds, pids, labels, [f"l{j}" for j in range(labels.shape[1])])
    for j in range(labels.shape[1]):
        pos = [e["positives"][f"l{j}"] for e in table["folds"]]
        # iterative stratification keeps per-label positives within a few of the mean
        assert max(pos) - min(pos) <= max(4, 0.5 * np.mean(pos)), (j, pos)
    sizes = [e["volumes"] for e in table["folds"]]
    assert max(sizes) - min(sizes) <= 0.15 * np.mean(sizes)


def test_same_seed_same_folds_other_seed_other_folds():
    names, pids, labels = _dataset()
    a = assign_folds(pids, labels, 5, 7)
    assert np.array_equal(a, assign_folds(pids, labels, 5, 7))
    assert not np.array_equal(a, assign_folds(pids, labels, 5, 8))


def test_folds_do_not_depend_on_row_order():
    names, pids, labels = _dataset(30)
    order = np.random.default_rng(3).permutation(len(names))
    a = assign_folds(pids, labels, 3, 0)
    b = assign_folds([pids[i] for i in order], labels[order], 3, 0)
    assert np.array_equal(a[order], b)


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(FoldError, match="3 patients cannot fill 5 folds"):
        assign_folds(["a", "b", "c"], np.zeros((3, 2)), 5, 0)


def _store(tmp_path, names, pids, labels):
    cfg = PreprocessConfig(shape=[4, 8, 8])
    create_store(tmp_path / "s.zarr", volume_names=names, patient_ids=pids, labels=labels,
                 label_names=[f"l{j}" for j in range(labels.shape[1])], cfg=cfg)
    return tmp_path / "s.zarr"


def test_make_folds_writes_store_and_folds_json(tmp_path):
    names, pids, labels = _dataset(20)
    path = _store(tmp_path, names, pids, labels)
    table = make_folds(path, k=4, seed=0)
    store = open_store(path)
    assert np.array_equal(store.folds(), assign_folds(pids, labels, 4, 0))
    assert store.attrs["folds"]["k"] == 4 and table["k"] == 4
    entries = json.loads((tmp_path / "s.zarr.folds.json").read_text(encoding="utf-8"))
    assert len(entries) == 4
    for f, entry in enumerate(entries):
        assert sorted(entry["val"]) == sorted(np.asarray(names)[store.folds() == f].tolist())
        assert not set(entry["train"]) & set(entry["val"])
        assert len(entry["train"]) + len(entry["val"]) == len(names)


def test_from_file_round_trip_and_leak_rejection(tmp_path):
    names, pids, labels = _dataset(12)
    path = _store(tmp_path, names, pids, labels)
    make_folds(path, k=3, seed=0)
    original = open_store(path).folds()
    fold_file = tmp_path / "mine.json"
    fold_file.write_text((tmp_path / "s.zarr.folds.json").read_text(encoding="utf-8"), encoding="utf-8")
    assert np.array_equal(folds_from_file(fold_file, names, pids), original)
    # move one reconstruction of a multi-volume patient into another fold: a leak
    pid = next(p for p in pids if pids.count(p) > 1)
    rows = [i for i, p in enumerate(pids) if p == pid]
    csv = tmp_path / "leak.csv"
    pairs = enumerate(zip(names, original, strict=True))
    lines = ["VolumeName,fold"] + [f"{n},{(f + (i == rows[0])) % 3}" for i, (n, f) in pairs]
    csv.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(FoldError, match=f"patient {pid} leaks across folds"):
        make_folds(path, k=3, seed=0, from_file=csv)
    assert np.array_equal(open_store(path).folds(), original)   # rejected file changed nothing


def test_from_file_errors_name_the_problem(tmp_path):
    names, pids, labels = _dataset(6)
    partial = tmp_path / "p.csv"
    partial.write_text("VolumeName,fold\n" + f"{names[0]},0\n", encoding="utf-8")
    with pytest.raises(FoldError, match="have no fold"):
        folds_from_file(partial, names, pids)
    unknown = tmp_path / "u.csv"
    unknown.write_text("VolumeName,fold\nnope.nii.gz,0\n", encoding="utf-8")
    with pytest.raises(FoldError, match="'nope.nii.gz'.*not in the store"):
        folds_from_file(unknown, names, pids)


# ----------------------------------------------------------------- balance in volumes (issue 9)


def _ctrate_like(seed, n_patients=60, n_volumes=139):
    """60 patients / 139 volumes, 1-4 volumes per patient (1-2 scans x 1-2 reconstructions); the
    reconstructions of a scan share its labels, a patient's second scan differs in a few. Six
    findings at 10-40 % prevalence and two rare ones (the target exempts labels under 10 positives)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 5, n_patients)
    while per_patient.sum() != n_volumes:                     # nudge to the exact total, keeping 1..4
        i = rng.integers(n_patients)
        per_patient[i] = np.clip(per_patient[i] + np.sign(n_volumes - per_patient.sum()), 1, 4)
    prevalence = np.array([0.10, 0.15, 0.2, 0.25, 0.3, 0.4, 0.03, 0.05])
    names, pids, labels = [], [], []
    for p, n in enumerate(per_patient):
        first = rng.random(prevalence.size) < prevalence
        scans = [first, first ^ (rng.random(prevalence.size) < 0.1)]
        for v in range(n):
            scan = v // 2 if n > 2 else v % (1 + int(n == 2 and rng.random() < 0.5))
            names.append(f"train_{p}_{'ab'[scan]}_{v % 2 + 1}.nii.gz")
            pids.append(f"train_{p}")
            labels.append(scans[scan].astype(np.uint8))
    return names, pids, np.array(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_are_balanced_in_volumes_on_a_small_ctrate_like_set(seed):
    import time

    names, pids, labels = _ctrate_like(10 + seed)
    assert len(set(pids)) == 60 and len(names) == 139
    start = time.perf_counter()
    folds = assign_folds(pids, labels, k=5, seed=seed)
    elapsed = time.perf_counter() - start
    check_patient_disjoint(pids, folds, names)
    assert np.array_equal(folds, assign_folds(pids, labels, k=5, seed=seed))   # deterministic
    table = fold_table(folds, pids, labels, [f"l{j}" for j in range(labels.shape[1])])
    sizes = [e["volumes"] for e in table["folds"]]
    assert max(sizes) - min(sizes) <= 0.1 * np.mean(sizes), sizes
    checked = 0
    for j in range(labels.shape[1]):
        pos = [e["positives"][f"l{j}"] for e in table["folds"]]
        if sum(pos) >= 10:
            checked += 1
            assert max(pos) - min(pos) <= max(2, 0.2 * np.mean(pos)), (j, pos)
    assert checked >= 5                                        # the set exercises the target
    ratios = {f"l{j}": table["spread"][f"l{j}"] / max(2, 0.2 * labels[:, j].sum() / 5)
              for j in range(labels.shape[1]) if labels[:, j].sum() >= 10}
    worst = table["worst_spread"]                              # what make-folds prints
    assert worst["ratio"] == pytest.approx(max(ratios.values()), abs=1e-3) and worst["label"] in ratios
    assert elapsed < 2.0, f"{elapsed:.2f} s (target: under a second on an idle core)"


def test_refinement_beats_its_stratified_start():
    from ctprep.fold_balance import balance, objective, patient_counts
    from ctprep.folds import _stratified_patient_folds

    _names, pids, labels = _ctrate_like(3)
    patients, union = patient_label_union(pids, labels)
    index = {p: i for i, p in enumerate(patients)}
    volume_patient = np.array([index[p] for p in pids])
    start = _stratified_patient_folds(union, 5, 0).astype(np.int64)
    refined = balance(start, volume_patient, labels, 5, seed=0)
    counts = patient_counts(volume_patient, labels, len(patients))
    assert objective(refined, counts, 5) < objective(start, counts, 5)
    assert np.bincount(refined, minlength=5).min() > 0          # no fold emptied
