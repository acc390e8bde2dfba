"""Is the CNN short of its floor for lack of data? One validation fold, growing training sets.

    python bench/learning_curve.py --config configs/demo.yaml --cache STORE --sizes 48,96,all \
        [--fold 0] [--set section.key=value ...] [--work DIR]

For each size n the store is viewed with only n of its training patients (those outside `--fold`):
a view is a folder beside the others in `--work` whose arrays are symbolic links to the store's,
except `written`, which is copied and has every other training row cleared, so `cttrain` skips
those rows as unwritten (nothing of the store itself is touched or copied). The n patients are the
first n of one seeded permutation of the training patients, so the sets are nested (the 48 are
among the 96). The validation fold is the same for every size. Then, as a user runs them:

    cttrain baseline --config C --cache VIEW --out WORK/floor_n      (the floor, on the same rows)
    cttrain fold F --config C --cache VIEW --out WORK/run_n          (the CNN, its last epoch)

and the fold's validation AUROC per label of both, read from their prediction tables
(results/fold_F_predictions.csv; the floor's results/floor_oof_predictions.csv, matched by volume).
Labels with one class among the validation rows are left out. Prints a table and writes
bench/results/learning_curve.json (--out). A local store only (symbolic links).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import DEFAULT_OUT, _child_env, console_command, emit, fmt, log, machine_info

SEED = 0   # of the permutation that picks the training patients of each size


def make_view(store: Path, view: Path, keep_rows: np.ndarray) -> None:
    """`view`: the store's arrays as symbolic links, `written` copied and cleared outside `keep_rows`."""
    import zarr

    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for entry in store.iterdir():
        if entry.name == "written":
            shutil.copytree(entry, view / entry.name)
        elif entry.is_dir():
            (view / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
        else:
            shutil.copy2(entry, view / entry.name)
    written = zarr.open_array(str(view / "written"), mode="r+")
    flags = np.asarray(written[:], dtype=bool)
    keep = np.zeros_like(flags)
    keep[keep_rows] = True
    written[:] = flags & keep


def training_subsets(patient_ids: list[str], folds: np.ndarray, fold: int, sizes: list[int | None]
                     ) -> list[tuple[int, np.ndarray]]:
    """(patients, rows to keep written) per size: every validation row, plus the training rows of
    the first n patients of one seeded permutation (None = all of them)."""
    pids = np.asarray(patient_ids)
    train_patients = np.unique(pids[(folds >= 0) & (folds != fold)])
    order = np.random.default_rng(SEED).permutation(train_patients)
    out = []
    for n in sizes:
        n = len(order) if n is None else min(int(n), len(order))
        chosen = np.isin(pids, order[:n])
        out.append((n, np.flatnonzero((folds == fold) | (chosen & (folds >= 0)))))
    return out


def fold_aurocs(pred_csv: Path, names: list[str], labels: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """AUROC per label of `pred_csv`'s rows for the validation volumes `names` (`labels`: their
    rows); a table may hold other rows too (the floor's holds every fold's). Labels with one class
    among these volumes are left out."""
    from ctprep.naming import case_id
    from cttrain.evaluate import read_prediction_table
    from cttrain.metrics import per_label_auroc

    ids, probs, _ = read_prediction_table(pred_csv, label_names)
    index = {name: i for i, name in enumerate(ids)}
    missing = [n for n in names if case_id(n) not in index]
    if missing:
        raise SystemExit(f"{pred_csv}: no prediction for {len(missing)} validation volumes (first: {missing[0]})")
    rows = [index[case_id(n)] for n in names]
    aurocs = per_label_auroc(labels, probs[rows])
    return {label: a for label, a in zip(label_names, aurocs, strict=True) if a is not None}


def _sizes(text: str) -> list[int | None]:
    """`--sizes`: positive integers or 'all', comma-separated."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise SystemExit(f"--sizes: {part!r} is neither a positive number of patients nor 'all'")
    return out


def _run(cmd: list[str], log_path: Path) -> float:
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env())
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log_path}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True, help="a local ctprep store with folds")
    p.add_argument("--sizes", default="48,96,all", help="training patients per point, comma-separated; 'all'")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="cttrain override")
    p.add_argument("--work", type=Path, default=None, help="views and run directories (default: beside --out)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from cttrain.reader import StoreReader

    store = args.cache.resolve()
    if not (store / "zarr.json").is_file():
        raise SystemExit(f"{args.cache}: not a local ctprep store (no zarr.json); the views link its arrays")
    sizes = _sizes(args.sizes)
    reader = StoreReader(store)
    folds = reader.folds
    if not (folds >= 0).any():
        raise SystemExit(f"{store}: no folds (run `ctprep make-folds {store}`)")
    if not ((folds == args.fold) & reader.written).any():
        raise SystemExit(f"{store}: --fold {args.fold} has no written volumes")
    work = (args.work or args.out / "learning_curve").resolve()
    work.mkdir(parents=True, exist_ok=True)
    val = np.flatnonzero((folds == args.fold) & reader.written)
    names = [reader.volume_names[r] for r in val]
    labels = reader.labels[val].astype(np.int64)
    overrides = [a for o in args.set for a in ("--set", o)]
    points = []
    for n, keep in training_subsets(reader.patient_ids, folds, args.fold, sizes):
        view = work / f"train{n}.zarr"
        make_view(store, view, keep)
        common = ["--config", str(args.config), "--cache", str(view), *overrides]
        log(f"{n} training patients: floor, then `cttrain fold {args.fold}` ...")
        floor_dir, run_dir = work / f"floor_{n}", work / f"run_{n}"
        floor_s = _run([*console_command("cttrain"), "baseline", *common, "--out", str(floor_dir)],
                       work / f"floor_{n}.log")
        shutil.rmtree(run_dir, ignore_errors=True)
        cnn_s = _run([*console_command("cttrain"), "fold", str(args.fold), *common, "--out", str(run_dir)],
                     work / f"run_{n}.log")
        cnn = fold_aurocs(run_dir / "results" / f"fold_{args.fold}_predictions.csv", names, labels,
                          reader.label_names)
        floor = fold_aurocs(floor_dir / "results" / "floor_oof_predictions.csv", names, labels, reader.label_names)
        train_rows = np.setdiff1d(keep, val)
        points.append({"patients": n, "volumes": int(len(train_rows)), "cnn": cnn, "floor": floor,
                       "cnn_macro": float(np.mean(list(cnn.values()))),
                       "floor_macro": float(np.mean(list(floor.values()))),
                       "cnn_seconds": round(cnn_s, 1), "floor_seconds": round(floor_s, 1)})
    result = {"store": str(store), "config": str(args.config), "fold": args.fold, "overrides": args.set,
              "validation_volumes": len(val), "points": points, "machine": machine_info()}
    label_cols = sorted({k for pt in points for k in pt["cnn"]})
    rows = [(str(pt["patients"]), str(pt["volumes"]), fmt(pt["cnn_macro"], 3), fmt(pt["floor_macro"], 3),
             f"{pt['cnn_macro'] - pt['floor_macro']:+.3f}",
             *(f"{fmt(pt['cnn'].get(k), 2)}/{fmt(pt['floor'].get(k), 2)}" for k in label_cols),
             f"{pt['cnn_seconds']:.0f}") for pt in points]
    emit("learning_curve", result, args, rows,
         ("patients", "volumes", "CNN", "floor", "CNN-floor", *(f"{k} CNN/floor" for k in label_cols), "CNN s"),
         f"fold {args.fold} validation AUROC ({len(val)} volumes) by training patients")


if __name__ == "__main__":
    sys.exit(main())
