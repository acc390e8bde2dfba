"""Patient-level, multi-label-stratified fold assignment (`ctprep make-folds`).

Iterative stratification (Sechidis, Tsoumakas & Vlahavas, "On the Stratification of Multi-Label
Data", ECML PKDD 2011; implementation: the `iterative-stratification` package) is run over
*patients*, each represented by the union of its volumes' labels, so all scans and reconstructions of
one patient land in one fold (the pipeline we replace split by row and leaked patients across folds).
The stratifier balances patients; `ctprep.fold_balance` then moves and swaps whole patients so that
what training and evaluation count, volumes per fold and positive volumes per label, is even too.
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


def assign_folds(patient_ids: Sequence[str], labels: np.ndarray, k: int, seed: int,
                 candidates: int = 4) -> np.ndarray:
    """Fold index (0..k-1) per volume; deterministic for a given seed and input data.

    Iterative stratification over patients with `candidates` random states derived from `seed`
    gives the start most even in volumes; `fold_balance.balance` then refines it by whole-patient
    moves and swaps (and tries a greedy start too), minimising the squared relative deviation of
    fold sizes and of every label's positive volumes per fold."""
    from ctprep.fold_balance import balance, objective, patient_counts

    patients, union = patient_label_union(patient_ids, labels)
    if k < 2:
        raise FoldError(f"--folds must be >= 2, got {k}")
    if len(patients) < k:
        raise FoldError(f"{len(patients)} patients cannot fill {k} folds (need at least one patient per fold)")
    # Sorting patients first makes the result independent of row order in the labels CSV.
    order = np.argsort(np.asarray(patients, dtype=object), kind="stable")
    rank = np.empty(len(patients), dtype=np.int64)
    rank[order] = np.arange(len(patients))
    index = {p: i for i, p in enumerate(patients)}
    volume_patient = rank[np.fromiter((index[p] for p in patient_ids), dtype=np.int64, count=len(patient_ids))]
    counts = patient_counts(volume_patient, labels, len(patients))   # patients in sorted order
    best, best_score = None, np.inf
    for c in range(max(1, candidates)):
        start = _stratified_patient_folds(union[order], k, seed * 1009 + c).astype(np.int64)
        score = objective(start, counts, k)
        if score < best_score - 1e-12:
            best, best_score = start, score
    patient_fold = balance(best, volume_patient, labels, k, seed)
    return patient_fold[volume_patient].astype(np.int8)


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
    """Read a user's fold file: a `<store>.folds.json` (list of {train, val} by volume name, as we write it)
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
    """`<store>.folds.json` content: one {train, val} entry per fold, by volume name."""
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
    out.update(_spreads(out["folds"], label_names))
    return out


def _spreads(entries: list[dict[str, Any]], label_names: Sequence[str]) -> dict[str, Any]:
    """max - min over folds per label and of fold sizes, and the worst label relative to the
    make-folds target (max(2, 20 % of the per-fold mean) for labels with >= 10 positives)."""
    if not entries:
        return {"spread": {}, "size_spread": 0, "worst_spread": None}
    sizes = [e["volumes"] for e in entries]
    spread, rows = {}, []
    for name in label_names:
        pos = [e["positives"][name] for e in entries]
        mean = float(np.mean(pos))
        spread[name] = max(pos) - min(pos)
        allowed = max(2.0, 0.2 * mean)
        rows.append({"label": name, "spread": spread[name], "mean": round(mean, 2), "allowed": round(allowed, 2),
                     "positives": sum(pos), "ratio": round(spread[name] / allowed, 3)})
    # The target is for labels with >= 10 positives; rarer ones only when no label has that many.
    pool = [r for r in rows if r["positives"] >= 10] or [r for r in rows if r["positives"] > 0]
    worst = max(pool, key=lambda r: r["ratio"]) if pool else None
    return {"spread": spread, "size_spread": max(sizes) - min(sizes), "worst_spread": worst}


def make_folds(store_path: str | Path, *, k: int, seed: int, from_file: Path | None = None) -> dict[str, Any]:
    """Assign folds, write the store's `folds` array (+ attrs) and the fold lists beside the store
    (`<store>.folds.json`)."""
    from ctprep.remote import write_text
    from ctprep.store import open_store

    store = open_store(store_path, mode="r+")
    names, pids, labels = store.volume_names, store.patient_ids, store.labels()
    if from_file is not None:
        folds = folds_from_file(Path(from_file), names, pids)
        meta = {"k": int(folds.max()) + 1, "seed": None, "method": "file", "source": str(from_file)}
    else:
        folds = assign_folds(pids, labels, k, seed)
        meta = {"k": k, "seed": seed, "method": "patient-multilabel-iterative-stratification+volume-balance"}
    check_patient_disjoint(pids, folds, names)
    # Write the fold lists first: if that fails, the store is untouched.
    folds_json = folds_json_path(store_path)
    write_text(folds_json, json.dumps(fold_lists(names, folds), indent=1))
    meta["folds_json"] = str(folds_json)
    store.write_folds(folds, meta)
    table = fold_table(folds, pids, labels, store.label_names, store.written())
    table.update(meta=meta)
    return table


def folds_json_path(store_path: str | Path) -> Path | str:
    """`<store>.folds.json` beside the store (a URL beside a remote store)."""
    from ctprep.store import side_file

    return side_file(store_path, "folds")
