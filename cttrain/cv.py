"""k-fold cross-validation: run every fold, pool the out-of-fold (OOF) predictions, tune the per-label
thresholds on them and write the run's summaries (layout in DESIGN.md).

    results/fold_k.json, fold_k_predictions.csv, fold_k_labels.csv   written by `engine.train_fold`
    results/oof_predictions.csv, oof_labels.csv                       every held-out row exactly once
    results/thresholds.json                                           tuned on all OOF predictions
    results/floor_oof_predictions.csv, floor.json                      the sanity floor (cttrain/floor.py)
    results/cv_results_detailed.json, cv_summary.json                 per fold and pooled metrics

Folds run in this process one after another, or, given several devices, one `cttrain fold`
subprocess per device (cttrain/scheduler.py). After the folds, the sanity floor is fitted on the
same folds and compared label by label with the CNN (`floor`, `below_floor`). A finished fold (its
`results/fold_k.json` exists) is skipped on `--resume`; an interrupted one continues from its
last checkpoint (the engine's job).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctprep.config import ConfigError, to_dict
from cttrain.config import ExperimentConfig, load_config, save_config
from cttrain.metrics import MACRO_METRICS, challenge_metrics, jsonable, ranking_score
from cttrain.predict import record_store
from cttrain.scheduler import run_parallel
from cttrain.thresholds import apply_fold_thresholds, nested_fold_thresholds, save_thresholds, tune_thresholds

# Keys that say where and how fast a run executes, not what it computes: a resumed run may change
# them (e.g. `cv --devices` resumes each fold with its own `training.device`).
RUNTIME_KEYS = frozenset({"training.device", "training.ddp_backend", "training.log_every", "data.num_workers",
                          "data.prefetch", "data.pin_memory"})
SUMMARY_METRICS = ("auroc_macro", "f1_macro", "precision_macro", "recall_macro", "accuracy", "ranking_score", "crg")
RANKING_NOTE = ("ranking_score is the mean of the five macro metrics (AUROC, F1, precision, recall, "
                "accuracy); it is ours, for comparing runs: the challenge ranks teams by a points system")


class CVError(Exception):
    """A cross-validation problem a user can fix; the message says what to run or change."""


# ---------------------------------------------------------------------------------- store and config


def _fold_count(store: Any) -> int:
    meta = store.attrs.get("folds")
    if isinstance(meta, dict) and isinstance(meta.get("k"), int):
        return int(meta["k"])
    folds = store.folds()[store.written()]
    return len(np.unique(folds[folds >= 0]))


def store_fold_count(cache: str | Path) -> int:
    """Number of folds of a store: the `folds` attrs `k` written by `ctprep make-folds`, else the
    number of distinct fold values among written rows (0 before make-folds)."""
    from ctprep.store import open_store

    return _fold_count(open_store(cache))


def check_folds(cache: str | Path, k: int) -> None:
    """Raise CVError unless the store is split into exactly `k` folds covering every written row."""
    from ctprep.store import open_store

    store = open_store(cache)
    store_k = _fold_count(store)
    fix = f"run ctprep make-folds {cache} --folds {k}"
    if store_k == 0:
        raise CVError(f"{cache}: the store has no folds yet; {fix}")
    if store_k != k:
        raise CVError(f"store has {store_k} folds; --folds {k} asked; {fix}")
    folds = store.folds()[store.written()]
    outside = int(((folds < 0) | (folds >= k)).sum())
    if outside:
        raise CVError(f"{cache}: {outside} written row(s) have no fold in 0..{k - 1}; {fix}")


def flat_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """`{"section.key": value}` of a config (nested mappings are compared as a whole)."""
    return {f"{section}.{key}": value for section, values in to_dict(cfg).items() for key, value in values.items()}


def config_changes(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Differences outside RUNTIME_KEYS, as `section.key: old -> new`."""
    a, b = flat_config(old), flat_config(new)
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if key not in RUNTIME_KEYS and a.get(key) != b.get(key)]


def write_run_config(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Save the resolved config as RUN_DIR/config.yaml (atomically).

    A file that already holds the same experiment is left alone (so parallel fold processes never
    race on it); with `resume` a different experiment is a ConfigError naming the changed keys.
    """
    path = Path(run_dir) / "config.yaml"
    if path.exists():
        changes = config_changes(load_config(path), cfg)
        if not changes:
            return path
        if resume:
            raise ConfigError(f"{path}: --resume with a changed config ({'; '.join(changes[:3])}); "
                              "drop the change or use a new --out")
    tmp = _tmp(path)
    save_config(cfg, tmp)
    os.replace(tmp, path)
    return path


def _tmp(path: Path) -> Path:
    """A temporary name beside `path`, private to this process (parallel folds write the same files)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(jsonable(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------- running folds


def fold_done(run_dir: str | Path, fold: int) -> bool:
    return (Path(run_dir) / "results" / f"fold_{fold}.json").exists()


def run_fold(cfg: ExperimentConfig, run_dir: str | Path, fold: int, *, k: int, resume: bool = False,
             console: Any = None, write: bool = True) -> dict:
    """Train one fold (the `cttrain fold` command); `write=False` on non-zero DDP ranks."""
    if not 0 <= fold < k:
        raise CVError(f"fold {fold} does not exist: the store has folds 0..{k - 1}")
    check_folds(cfg.data.cache, k)
    if write:
        write_run_config(cfg, run_dir, resume=resume)
        record_store(run_dir, cfg.data.cache)
    from cttrain.engine import train_fold

    return train_fold(cfg, fold, Path(run_dir), k=k, resume=resume, console=console)


def run_cv(cfg: ExperimentConfig, run_dir: Path, *, k: int, resume: bool = False,
           devices: list[str] | None = None, console: Any = None) -> dict:
    """Run all `k` folds, then `summarize`. Returns the cv_summary.json content."""
    from rich.console import Console

    console = console or Console()
    run_dir = Path(run_dir)
    check_folds(cfg.data.cache, k)
    cfg = dataclasses.replace(cfg, folds=dataclasses.replace(cfg.folds, k=k))
    write_run_config(cfg, run_dir, resume=resume)
    record_store(run_dir, cfg.data.cache)
    from cttrain.baseline import run_floor
    from cttrain.floor import floor_lines, write_floor

    # The floor first (seconds on the demo): a chance-level store is named before training time is spent.
    console.print(floor_lines({"floor": write_floor(run_dir / "results", run_floor(
        cfg.data.cache, k, channels=cfg.data.channels))})[0])
    todo = [f for f in range(k) if not (resume and fold_done(run_dir, f))]
    if len(todo) < k:
        console.print(f"resume: fold(s) {sorted(set(range(k)) - set(todo))} already finished, skipped")
    if devices and len(devices) > 1:
        run_parallel(run_dir, todo, devices, k=k, resume=resume, console=console)
    else:
        from cttrain.engine import train_fold

        if devices:
            cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, device=devices[0]))
        for fold in todo:
            train_fold(cfg, fold, run_dir, k=k, resume=resume, console=console)
    summary = summarize(run_dir, k, method=cfg.evaluation.tune_thresholds)
    pooled = summary["oof"]["auroc_macro"]
    console.print(f"CV macro AUROC {summary['auroc_macro']} over {summary['valid_folds']}/{k} folds; pooled "
                  f"OOF AUROC {'n/a' if pooled is None else f'{pooled:.4f}'}; {run_dir / 'results'}")
    for line in floor_lines(json.loads((run_dir / "results" / "cv_results_detailed.json").read_text(encoding="utf-8"))):
        console.print(line)
    return summary


# ---------------------------------------------------------------------------------- OOF tables


@dataclasses.dataclass
class OOF:
    """Pooled out-of-fold rows: names (N,), folds (N,), probs and labels (N, L)."""

    volume_names: list[str]
    folds: np.ndarray
    label_names: list[str]
    probs: np.ndarray
    labels: np.ndarray


def read_table(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """A VolumeName + numeric-columns CSV -> (names, value columns, values); a `fold` column is dropped."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except FileNotFoundError:
        raise CVError(f"{path}: missing (the fold did not finish writing its outputs?)") from None
    if not rows or rows[0][:1] != ["VolumeName"]:
        raise CVError(f"{path}: expected a header starting with VolumeName")
    keep = [j for j, name in enumerate(rows[0]) if j > 0 and name != "fold"]
    try:
        values = np.array([[float(row[j]) for j in keep] for row in rows[1:]], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise CVError(f"{path}: unreadable value ({exc})") from None
    return [row[0] for row in rows[1:]], [rows[0][j] for j in keep], values.reshape(len(rows) - 1, len(keep))


def read_fold_outputs(results: Path, folds: Sequence[int]) -> OOF:
    """Pool results/fold_k_predictions.csv and fold_k_labels.csv; a volume held out twice is an error."""
    names: list[str] = []
    fold_ids, probs, labels = [], [], []
    label_names: list[str] | None = None
    for f in folds:
        pred_names, columns, p = read_table(results / f"fold_{f}_predictions.csv")
        label_path = results / f"fold_{f}_labels.csv"
        truth_names, truth_columns, y = read_table(label_path)
        label_names = label_names or columns
        if columns != label_names or set(truth_columns) != set(columns):
            raise CVError(f"{results}: fold {f} has other label columns than fold {folds[0]}")
        where = {name: i for i, name in enumerate(truth_names)}
        missing = [name for name in pred_names if name not in where]
        if missing:
            raise CVError(f"{label_path}: no labels for {len(missing)} predicted volume(s), e.g. {missing[0]}")
        order = [truth_columns.index(c) for c in columns]
        labels.append(y[[where[name] for name in pred_names]][:, order])
        names += pred_names
        fold_ids.append(np.full(len(pred_names), f))
        probs.append(p)
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        raise CVError(f"{results}: volume {twice[0]} is held out in more than one fold")
    return OOF(names, np.concatenate(fold_ids), list(label_names or []), np.concatenate(probs),
               np.concatenate(labels).astype(np.uint8))


def _write_csv(path: Path, header: list[str], rows: Any) -> None:
    tmp = _tmp(path)
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def write_predictions(path: Path, oof: OOF) -> None:
    """VolumeName, fold, one probability column per label (oof_predictions.csv and the floor's)."""
    rows = zip(oof.volume_names, oof.folds, oof.probs, strict=True)
    _write_csv(path, ["VolumeName", "fold", *oof.label_names],
               [[v, int(f), *(f"{x:.9g}" for x in p)] for v, f, p in rows])


def write_oof(results: Path, oof: OOF) -> None:
    """results/oof_predictions.csv and oof_labels.csv (the labels-CSV shape), so `cttrain evaluate`
    can score the pooled predictions."""
    write_predictions(results / "oof_predictions.csv", oof)
    rows = zip(oof.volume_names, oof.labels, strict=True)
    _write_csv(results / "oof_labels.csv", ["VolumeName", *oof.label_names],
               [[v, *(int(x) for x in y)] for v, y in rows])


# ---------------------------------------------------------------------------------- summaries


def _flat_metrics(metrics: dict) -> dict[str, float | None]:
    """challenge_metrics dict -> the SUMMARY_METRICS names (None where undefined)."""
    macro = metrics.get("macro") or {}
    out = {f"{m}_macro" if m != "accuracy" else m: _finite(macro.get(m)) for m in MACRO_METRICS}
    out["ranking_score"] = _finite(ranking_score(macro)) if macro else None
    out["crg"] = _finite(metrics.get("crg"))
    return out


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _mean_std(values: list[float | None]) -> dict[str, float | None]:
    """Mean and population std (ddof=0, numpy's default) of the defined values."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(defined)), "std": float(np.std(defined))}


def _human(stat: dict[str, float | None]) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def _fold_block(k: int, fold_json: dict, y: np.ndarray, p: np.ndarray, tuned: np.ndarray,
                names: list[str], thresholds: np.ndarray) -> dict:
    metrics = fold_json.get("metrics") or challenge_metrics(y, p, names)
    flat = _flat_metrics(metrics)
    return {
        "fold": k, "valid": flat["auroc_macro"] is not None,
        **{key: fold_json.get(key) for key in ("oof_epoch", "best_epoch", "epochs_run", "n_train", "n_val")},
        **flat, "macro": metrics.get("macro"), "per_label": metrics.get("per_label"),
        "nested_thresholds": dict(zip(names, thresholds.tolist(), strict=True)),
        "f1_macro_untuned": challenge_metrics(y, p, names)["macro"]["f1"],
        "f1_macro_tuned": challenge_metrics(y, tuned, names)["macro"]["f1"],
    }


def summarize(run_dir: str | Path, k: int, method: str | None = None) -> dict:
    """(Re)build the pooled OOF files, thresholds.json and both summaries from the fold outputs.

    Folds without `results/fold_k.json` are left out (listed under `missing_folds`); `method`
    defaults to the run config's `evaluation.tune_thresholds`. Returns the cv_summary.json content.
    """
    run_dir = Path(run_dir)
    results = run_dir / "results"
    if method is None:
        saved = run_dir / "config.yaml"
        method = load_config(saved).evaluation.tune_thresholds if saved.exists() else "f1"
    done = [f for f in range(k) if fold_done(run_dir, f)]
    if not done:
        raise CVError(f"{results}: no finished fold (no fold_k.json); run `cttrain cv` first")
    fold_json = {f: json.loads((results / f"fold_{f}.json").read_text(encoding="utf-8")) for f in done}
    oof = read_fold_outputs(results, done)
    write_oof(results, oof)
    y, p, names, folds = oof.labels, oof.probs, oof.label_names, oof.folds

    pooled = challenge_metrics(y, p, names)
    if method == "none":
        thresholds = np.full(len(names), 0.5)
        nested = {f: thresholds for f in done}
    else:
        thresholds = tune_thresholds(y, p, method)
        nested = nested_fold_thresholds(y, p, folds, method)
    save_thresholds(results / "thresholds.json", names, thresholds, method,
                    {"source": "out-of-fold predictions", "folds": done, "n": int(len(y))})
    tuned = apply_fold_thresholds(p, folds, nested)
    pooled_tuned = challenge_metrics(y, tuned, names)
    from cttrain.floor import below_floor, load_floor

    floor = load_floor(results)  # None for runs made before the floor
    below = below_floor(pooled["per_label"], floor)

    blocks = [_fold_block(f, fold_json[f], y[folds == f], p[folds == f], tuned[folds == f], names, nested[f])
              for f in done]
    valid = [b for b in blocks if b["valid"]]
    stats = {name: _mean_std([b[name] for b in valid]) for name in SUMMARY_METRICS}
    oof_flat = {**_flat_metrics(pooled), "f1_macro_tuned": pooled_tuned["macro"]["f1"],
                "crg_tuned": _finite(pooled_tuned["crg"]), "threshold_method": method, "n": int(len(y))}
    summary = {
        **{name: _human(stats[name]) for name in SUMMARY_METRICS if name != "crg"},
        "valid_folds": len(valid), "total_folds": k,
        "metrics": stats, "oof": oof_flat, "missing_folds": [f for f in range(k) if f not in done],
        "floor": floor, "below_floor": below, "note": RANKING_NOTE,
        # which validation of each fold these numbers are (evaluation.oof_epoch: last = honest)
        "oof_epoch": sorted({str(fold_json[f].get("oof_rule") or "best") for f in done}),
    }
    detailed = {
        "folds": {str(b["fold"]): b for b in blocks},
        "oof": {"macro": pooled["macro"], "per_label": pooled["per_label"], "crg": pooled["crg"],
                "macro_tuned": pooled_tuned["macro"], "crg_tuned": pooled_tuned["crg"], "n": pooled["n"]},
        "thresholds": {"method": method, "values": dict(zip(names, thresholds.tolist(), strict=True))},
        "floor": floor, "below_floor": below, "summary": summary,
    }
    write_json(results / "cv_results_detailed.json", detailed)
    write_json(results / "cv_summary.json", summary)
    return jsonable(summary)  # type: ignore[return-value]
