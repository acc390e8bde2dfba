"""Patient-level, multi-label-stratified fold assignment (`ctprep make-folds`).

Iterative stratification (Sechidis, Tsoumakas & Vlahavas, "On the Stratification of Multi-Label
Data", ECML PKDD 2011; implementation: the `iterative-stratification` package) is run over
*patients*, each represented by the union of its volumes' labels, so all scans and reconstructions of
one patient land in one fold (the pipeline we replace split by row and leaked patients across folds).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class FoldError(ValueError):
    """A fold request or fold file that cannot be honoured; the message names the cause."""


def patient_label_union(patient_ids: Sequence[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Unique patients (first-seen order) and the OR of their volumes' labels."""
    index: dict[str, int] = {}
    for pid in patient_ids:
        index.setdefault(pid, len(index))
    union = np.zeros((len(index), labels.shape[1]), dtype=np.uint8)
    rows = np.fromiter((index[p] for p in patient_ids), dtype=np.int64, count=len(patient_ids))
    np.maximum.at(union, rows, labels.astype(np.uint8))
    return list(index), union


def _stratified_patient_folds(union: np.ndarray, k: int, random_state: int) -> np.ndarray:
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=random_state)
    patient_fold = np.full(len(union), -1, dtype=np.int8)
    for fold, (_train, val) in enumerate(splitter.split(np.zeros(len(union)), union)):
        patient_fold[val] = fold
    return patient_fold


def _imbalance(volume_fold: np.ndarray, labels: np.ndarray, k: int) -> float:
    """How unevenly volumes and per-label positives spread over folds (0 = perfectly even)."""
    onehot = np.eye(k, dtype=np.float64)[volume_fold]                # (N, k)
    sizes = onehot.sum(0)
    positives = onehot.T @ labels.astype(np.float64)                 # (k, L)
    mean_pos = positives.mean(0)
    used = mean_pos > 0
    pos_cv = (positives[:, used].std(0) / mean_pos[used]).mean() if used.any() else 0.0
    return float(pos_cv + sizes.std() / sizes.mean())


def assign_folds(patient_ids: Sequence[str], labels: np.ndarray, k: int, seed: int,
                 candidates: int = 8) -> np.ndarray:
    """Fold index (0..k-1) per volume; deterministic for a given seed and input data.

    The stratifier balances *patients*; patients contribute different numbers of volumes, so we run it
    with `candidates` random states derived from `seed` and keep the split whose per-fold volume
    counts and per-label volume positives are most even."""
    patients, union = patient_label_union(patient_ids, labels)
    if k < 2:
        raise FoldError(f"--folds must be >= 2, got {k}")
    if len(patients) < k:
        raise FoldError(f"{len(patients)} patients cannot fill {k} folds (need at least one patient per fold)")
    # Sorting patients first makes the result independent of row order in the labels CSV.
    order = np.argsort(np.asarray(patients, dtype=object), kind="stable")
    index = {p: i for i, p in enumerate(patients)}
    volume_patient = np.fromiter((index[p] for p in patient_ids), dtype=np.int64, count=len(patient_ids))
    best, best_score = None, np.inf
    for c in range(max(1, candidates)):
        patient_fold = np.empty(len(patients), dtype=np.int8)
        patient_fold[order] = _stratified_patient_folds(union[order], k, seed * 1009 + c)
        volume_fold = patient_fold[volume_patient]
        score = _imbalance(volume_fold, labels, k)
        if score < best_score - 1e-12:
            best, best_score = volume_fold, score
    return best


def check_patient_disjoint(patient_ids: Sequence[str], folds: np.ndarray, names: Sequence[str]) -> None:
    """Raise FoldError naming a patient whose volumes sit in more than one fold."""
    seen: dict[str, tuple[int, str]] = {}
    for pid, fold, name in zip(patient_ids, folds, names, strict=True):
        if pid in seen and seen[pid][0] != int(fold):
            other_fold, other_name = seen[pid]
            raise FoldError(
                f"patient {pid} leaks across folds: {other_name} in fold {other_fold}, {name} in fold {int(fold)}"
            )
        seen.setdefault(pid, (int(fold), name))


def folds_from_file(path: Path, volume_names: Sequence[str], patient_ids: Sequence[str]) -> np.ndarray:
    """Read a user's fold file: `folds.json` (list of {train, val} by volume name, as we write it)
    or a CSV with `VolumeName,fold`. Every store volume must be assigned exactly once and no patient
    may span folds."""
    from ctprep.naming import strip_volume_suffix

    key = {strip_volume_suffix(n): i for i, n in enumerate(volume_names)}
    folds = np.full(len(volume_names), -1, dtype=np.int8)
    for fold, names in _read_fold_lists(path).items():
        for name in names:
            row = key.get(strip_volume_suffix(str(name)))
            if row is None:
                raise FoldError(f"{path}: volume '{name}' (fold {fold}) is not in the store")
            if folds[row] not in (-1, fold):
                raise FoldError(f"{path}: volume '{name}' is in fold {folds[row]} and fold {fold}")
            folds[row] = fold
    missing = [volume_names[i] for i in np.flatnonzero(folds < 0)]
    if missing:
        raise FoldError(f"{path}: {len(missing)} store volumes have no fold (first: {missing[0]})")
    check_patient_disjoint(patient_ids, folds, volume_names)
    return folds


def _read_fold_lists(path: Path) -> dict[int, list[str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FoldError(f"cannot read fold file {path}: {exc.strerror or exc}") from None
    if Path(path).suffix.lower() == ".csv":
        import csv

        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "VolumeName" not in rows[0] or "fold" not in rows[0]:
            raise FoldError(f"{path}: a CSV fold file needs columns VolumeName,fold")
        out: dict[int, list[str]] = defaultdict(list)
        for lineno, row in enumerate(rows, start=2):
            try:
                out[int(row["fold"])].append(row["VolumeName"])
            except (TypeError, ValueError):
                raise FoldError(f"{path}: row {lineno}: fold {row['fold']!r} is not an integer") from None
        return dict(out)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FoldError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) and "val" in d for d in data):
        raise FoldError(f"{path}: expected a list of {{\"train\": [...], \"val\": [...]}} (one per fold)")
    return {fold: list(entry["val"]) for fold, entry in enumerate(data)}


def fold_lists(volume_names: Sequence[str], folds: np.ndarray) -> list[dict[str, list[str]]]:
    """folds.json content: one {train, val} entry per fold, by volume name."""
    k = int(folds.max()) + 1
    names = np.asarray(volume_names, dtype=object)
    return [{"train": names[folds != f].tolist(), "val": names[folds == f].tolist()} for f in range(k)]


def fold_table(folds: np.ndarray, patient_ids: Sequence[str], labels: np.ndarray,
               label_names: Sequence[str], written: np.ndarray | None = None) -> dict[str, Any]:
    """Per-fold volumes, patients and positives per label (for printing and tests)."""
    k = int(folds.max()) + 1 if folds.size and folds.max() >= 0 else 0
    pids = np.asarray(patient_ids, dtype=object)
    out: dict[str, Any] = {"k": k, "folds": []}
    for f in range(k):
        mask = folds == f
        entry = {
            "fold": f,
            "volumes": int(mask.sum()),
            "patients": len(set(pids[mask].tolist())),
            "positives": {name: int(labels[mask, j].sum()) for j, name in enumerate(label_names)},
        }
        if written is not None:
            entry["written"] = int((mask & written).sum())
        out["folds"].append(entry)
    out["unassigned"] = int((folds < 0).sum())
    return out


def make_folds(store_path: str | Path, *, k: int, seed: int, from_file: Path | None = None) -> dict[str, Any]:
    """Assign folds, write the store's `folds` array (+ attrs) and `folds.json` beside the store."""
    from ctprep.store import open_store

    store = open_store(store_path, mode="r+")
    names, pids, labels = store.volume_names, store.patient_ids, store.labels()
    if from_file is not None:
        folds = folds_from_file(Path(from_file), names, pids)
        meta = {"k": int(folds.max()) + 1, "seed": None, "method": "file", "source": str(from_file)}
    else:
        folds = assign_folds(pids, labels, k, seed)
        meta = {"k": k, "seed": seed, "method": "patient-multilabel-iterative-stratification"}
    check_patient_disjoint(pids, folds, names)
    # Write folds.json first: if that fails, the store is untouched.
    folds_json = folds_json_path(store_path)
    if folds_json is not None:
        tmp = folds_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(fold_lists(names, folds), indent=1), encoding="utf-8")
        tmp.replace(folds_json)
        meta["folds_json"] = str(folds_json)
    store.write_folds(folds, meta)
    table = fold_table(folds, pids, labels, store.label_names, store.written())
    table.update(meta=meta)
    return table


def folds_json_path(store_path: str | Path) -> Path | None:
    """`folds.json` beside the store (None for remote stores)."""
    if "://" in str(store_path):
        return None
    return Path(str(store_path).rstrip("/")).parent / "folds.json"
