"""Predict a store with the ensemble of a run's fold models and write a CSV or a VLM3D submission.

The ensemble is the mean probability of the k fold models (each trained on k-1 folds), optionally
averaged with a left-right flipped copy of every volume (test-time augmentation). The store may be
new data: every written row is predicted and its labels and folds are ignored. Its pixels must mean
what the run was trained on, so the windows (names, centres, widths) and the (D, H, W) shape must
match the run's store (RUN_DIR/store.json, else the run config's `preprocess` section).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ctprep.naming import LABEL_NAMES

FORMATS = ("csv", "vlm3d")
CHECKPOINTS = ("best_auroc", "best_f1", "last")


class PredictError(Exception):
    """A run directory, store or option that prediction cannot use; the message names it."""


def find_checkpoints(run_dir: Path, checkpoint: str) -> list[Path]:
    """RUN_DIR/checkpoints/fold_k/{fold_k_<checkpoint>.ckpt | last.ckpt}, in fold order."""
    if checkpoint not in CHECKPOINTS:
        raise PredictError(f"unknown checkpoint {checkpoint!r}; choose one of {', '.join(CHECKPOINTS)}")
    found = []
    for fold_dir in (run_dir / "checkpoints").glob("fold_*"):
        k = fold_dir.name.removeprefix("fold_")
        path = fold_dir / ("last.ckpt" if checkpoint == "last" else f"fold_{k}_{checkpoint}.ckpt")
        if k.isdigit() and path.is_file():
            found.append((int(k), path))
    if not found:
        raise PredictError(f"{run_dir}: no {checkpoint} checkpoint under checkpoints/fold_*/ "
                           "(train the run first with `cttrain cv`)")
    return [path for _, path in sorted(found)]


def record_store(run_dir: str | Path, cache: str | Path) -> Path:
    """Write RUN_DIR/store.json: what the run is trained on (windows, image shape, labels), so
    `predict` can refuse a store whose pixels mean something else."""
    from ctprep.store import open_store

    store = open_store(cache)
    info = {"path": str(cache), "fingerprint": store.fingerprint, "windows": store.windows,
            "image_shape": list(store.image_shape), "label_names": store.label_names,
            "folds": store.attrs.get("folds")}
    path = Path(run_dir) / "store.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomic(path, lambda handle: json.dump(info, handle, indent=2))


def _trained_store(run_dir: Path, cfg: Any) -> tuple[list[dict], list[int]]:
    """(windows, [D, H, W]) of the store the run was trained on."""
    from ctprep.config import to_dict

    path = run_dir / "store.json"
    if path.is_file():
        info = json.loads(path.read_text(encoding="utf-8"))
        d, _c, h, w = info["image_shape"]
        return list(info["windows"]), [d, h, w]
    return to_dict(cfg.preprocess.windows), list(cfg.preprocess.shape)


def check_store(run_dir: Path, cfg: Any, cache: str | Path, channels: list[str]) -> None:
    """Refuse a store whose windows or (D, H, W) shape differ from the run's (PredictError)."""
    from ctprep.store import open_store

    windows, shape = _trained_store(run_dir, cfg)
    store = open_store(cache)
    have = {w["name"]: (float(w["center"]), float(w["width"])) for w in store.windows}
    want = {w["name"]: (float(w["center"]), float(w["width"])) for w in windows}
    for name in channels or list(want):
        if name not in have:
            raise PredictError(f"{cache}: no window {name!r}; the run was trained on {', '.join(want)}")
        if name in want and have[name] != want[name]:
            raise PredictError(f"{cache}: window {name!r} is center/width {have[name]}, the run's is {want[name]}")
    if not channels and list(have) != list(want):
        raise PredictError(f"{cache}: windows {list(have)} differ from the run's {list(want)} (names or order)")
    d, _c, h, w = store.image_shape
    if [d, h, w] != list(shape):
        raise PredictError(f"{cache}: volumes are (D, H, W) = {(d, h, w)}, the run was trained on {tuple(shape)}; "
                           "rebuild the store with the run's preprocess config")


def _loader(run_dir: Path, cfg: Any, cache: str | Path, channels: list[str], batch_size: int | None,
            device: Any) -> tuple[Any, np.ndarray, Any]:
    """(reader, written rows, evaluation loader) of the store to predict on `device`.

    Memory is pinned only for a CUDA device: on a GPU host, `--device cpu` would otherwise pin every
    batch (and start a pin thread on the GPU) for nothing."""
    from cttrain.data import eval_loader
    from cttrain.reader import StoreReader

    check_store(run_dir, cfg, cache, channels)
    reader = StoreReader(cache, channels=channels or None)
    rows = np.flatnonzero(reader.written)
    if rows.size == 0:
        raise PredictError(f"{cache}: no written rows to predict (finish `ctprep build-cache` first)")
    loader = eval_loader(reader, rows, cfg.data, seed=cfg.training.seed, cuda=device.type == "cuda",
                         batch_size=batch_size)
    return reader, rows, loader


def ensemble_probs(run_dir: Path, cache: str | Path, *, checkpoint: str, tta_flip: bool,
                   batch_size: int | None, device: str) -> tuple[list[str], list[str], np.ndarray]:
    """(volume names, label names, mean probabilities (N, L)) over the run's fold models."""
    import torch

    from cttrain.checkpoint import load_model_from_checkpoint
    from cttrain.config import load_config
    from cttrain.distributed import resolve_device, use_device
    from cttrain.engine import predict_probs
    from cttrain.trainer import resolve_amp

    if not (run_dir / "config.yaml").is_file():
        raise PredictError(f"{run_dir}: not a cttrain run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    paths = find_checkpoints(run_dir, checkpoint)
    dev = resolve_device(device)
    use_device(dev)  # the pin thread and the bf16 check follow the current device
    amp_dtype = resolve_amp(cfg.training.amp, dev)[0]
    total, labels, loader, features = 0.0, None, None, None
    for path in paths:
        model, _ = load_model_from_checkpoint(path, dev)
        if loader is None:  # the fold models share the run config, so one loader serves them all
            labels = list(model.label_names)
            reader, rows, loader = _loader(run_dir, cfg, cache, list(model.channels), batch_size, dev)
        elif list(model.label_names) != labels:
            raise PredictError(f"{path}: label names differ from the other folds' models")
        offsets = None
        if model.floor_prior is not None:  # model.floor_prior: each fold's floor logits + its network's
            from ctprep.store import open_store
            from cttrain.prior import FloorPrior, StoreFeatures

            if features is None:
                features = StoreFeatures(cache, open_store(cache).windows, rows)
            offsets = features.offsets(FloorPrior.from_state(model.floor_prior))
        got_rows, probs = predict_probs(model, loader, dev, amp_dtype=amp_dtype, tta_flip=tta_flip,
                                        offsets=offsets)
        total = total + np.asarray(probs, dtype=np.float64)[np.argsort(got_rows)]  # back to row order
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return [reader.volume_names[r] for r in rows], labels, total / len(paths)


def _write_atomic(out: Path, write: Any) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # private: parallel folds write store.json
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        write(handle)
    os.replace(tmp, out)
    return out


def submission(names: list[str], label_names: list[str], probs: np.ndarray, kind: str = "remapped") -> list[dict]:
    """The VLM3D Task 2 submission structure, probabilities keyed by the 18 exact label names.

    `data[0]["cttrain"]["probabilities"]` records `kind` (raw | remapped); the official evaluator
    reads only `data[0]["outputs"][0]["value"]["predictions"]`, so the extra key is harmless there."""
    index = {name: j for j, name in enumerate(label_names)}
    missing = [name for name in LABEL_NAMES if name not in index]
    if missing:
        raise PredictError(f"the run's labels lack {len(missing)} challenge label(s), e.g. {missing[0]!r}; "
                           "a VLM3D submission needs all 18")
    predictions = [{"input_image_name": name,
                    "probabilities": {label: float(p[index[label]]) for label in LABEL_NAMES}}
                   for name, p in zip(names, probs, strict=True)]
    return [{"outputs": [{"value": {"predictions": predictions}}], "cttrain": {"probabilities": kind}}]


def predict(run_dir: str | Path, cache: str | Path, out: str | Path, *, fmt: str = "csv",
            checkpoint: str | None = "best_auroc", tta_flip: bool | None = False, batch_size: int | None = None,
            device: str = "auto", remapped: bool | None = None) -> Path:
    """Predict every written row of `cache` with the mean of the run's fold models; write `out`.

    `remapped`: fold the run's results/thresholds.json into the probabilities (a monotone map
    sending each tuned threshold to 0.5, which leaves AUROC unchanged), because the challenge
    thresholds every label at 0.5. None = the format's default: remapped for vlm3d (what the
    challenge scores), raw for csv (the ensemble's own probabilities, what AUROC, calibration and
    new threshold tuning want). Either way the file records which it holds.
    fmt="csv": the labels-CSV shape, `VolumeName` then one column per label named exactly as the
    label, then a `probabilities` column saying `raw` or `remapped` on every row.
    fmt="vlm3d": the challenge submission JSON (kind in `data[0]["cttrain"]["probabilities"]`).
    `checkpoint` / `tta_flip` None mean the run config's `evaluation.checkpoint` / `tta_flip`.
    """
    from cttrain.config import load_config
    from cttrain.evaluate import KIND_COLUMN
    from cttrain.thresholds import load_thresholds, remap

    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise PredictError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    remapped = fmt == "vlm3d" if remapped is None else remapped
    thresholds_path = run_dir / "results" / "thresholds.json"
    if remapped and not thresholds_path.is_file():
        raise PredictError(f"{thresholds_path}: missing, so the probabilities cannot be remapped; finish the run "
                           "with `cttrain cv` (it tunes thresholds on out-of-fold predictions) or pass --raw")
    if checkpoint is None or tta_flip is None:
        evaluation = load_config(run_dir / "config.yaml").evaluation if (run_dir / "config.yaml").is_file() else None
        checkpoint = checkpoint or (evaluation.checkpoint if evaluation else "best_auroc")
        tta_flip = bool(evaluation.tta_flip) if tta_flip is None and evaluation else bool(tta_flip)
    names, labels, probs = ensemble_probs(run_dir, cache, checkpoint=checkpoint, tta_flip=tta_flip,
                                          batch_size=batch_size, device=device)
    kind = "remapped" if remapped else "raw"
    if remapped:
        thresholds, _ = load_thresholds(thresholds_path, labels)
        probs = remap(np.clip(probs, 0.0, 1.0), thresholds)
    if fmt == "csv":
        def write(handle: Any) -> None:
            writer = csv.writer(handle)
            writer.writerow(["VolumeName", *labels, KIND_COLUMN])
            writer.writerows([name, *(f"{p:.9g}" for p in row), kind] for name, row in zip(names, probs, strict=True))

        return _write_atomic(out, write)
    payload = submission(names, labels, probs, kind)
    return _write_atomic(out, lambda handle: json.dump(payload, handle, indent=1, ensure_ascii=False))
