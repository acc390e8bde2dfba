"""Train one cross-validation fold: the epoch loop, validation, checkpoints, exact resume, DDP.

`train_fold` trains on every fold but `fold` and validates on `fold`. Per epoch, in this order:
train, validate (every `val_every` epochs and at the last), best checkpoints (+ the predictions of
a new best-AUROC model), one metrics.csv row, then `last.ckpt`. A `kill -9` at any point therefore
resumes from the last completed epoch: metrics.csv is cut back to that epoch and the epoch is
replayed bit for bit (schedule stepped per optimizer step, data order and augmentation pure
functions of seed, epoch and step, generators re-seeded per epoch, RNG states restored).

Files under RUN_DIR (DESIGN.md): checkpoints/fold_k/{fold_k_best_auroc,fold_k_best_f1,last}.ckpt,
logs/fold_k/metrics.csv (+ TensorBoard events when installed), results/fold_k.json,
results/fold_k_predictions.csv and fold_k_labels.csv. Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cttrain import distributed
from cttrain.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_from_checkpoint,
    resume_differences,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cttrain.config import ExperimentConfig
from cttrain.progress import FoldLog, ProgressDisplay
from cttrain.trainer import Trainer, TrainingError, configure_determinism, predict_probs, seed_everything


@dataclass
class FoldPaths:
    run_dir: Path
    fold: int

    def _ckpt(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / f"fold_{self.fold}" / name

    @property
    def best_auroc(self) -> Path:
        return self._ckpt(f"fold_{self.fold}_best_auroc.ckpt")

    @property
    def best_f1(self) -> Path:
        return self._ckpt(f"fold_{self.fold}_best_f1.ckpt")

    @property
    def last(self) -> Path:
        return self._ckpt("last.ckpt")

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs" / f"fold_{self.fold}"

    def result(self, suffix: str = ".json") -> Path:
        return self.run_dir / "results" / f"fold_{self.fold}{suffix}"


@dataclass
class FoldState:
    """Bookkeeping that survives a resume (stored in last.ckpt)."""

    epoch: int = 0                      # epochs completed
    best_auroc: float | None = None
    best_f1: float | None = None
    best_epoch: int | None = None       # 1-based epoch of the best-AUROC model
    best_f1_epoch: int | None = None
    bad_rounds: int = 0                 # validations since the last AUROC improvement
    stopped_early: bool = False
    train_seconds: float = 0.0
    best_metrics: dict[str, Any] | None = field(default=None, repr=False)
    oof_epoch: int | None = None        # 1-based epoch whose validation is the fold's result
    oof_metrics: dict[str, Any] | None = field(default=None, repr=False)

    def update(self, auroc: float, f1: float, epoch: int) -> tuple[bool, bool]:
        """Record a validation; returns (new best AUROC, new best F1). NaN never beats a number."""
        better_auroc = self.best_auroc is None or (math.isfinite(auroc) and
                                                   not (auroc <= self.best_auroc))
        better_f1 = self.best_f1 is None or f1 > self.best_f1
        if better_auroc:
            self.best_auroc, self.best_epoch, self.bad_rounds = auroc, epoch, 0
        else:
            self.bad_rounds += 1
        if better_f1:
            self.best_f1, self.best_f1_epoch = f1, epoch
        return better_auroc, better_f1


class FoldRun:
    """The pieces of one fold's run shared by the steps of `train_fold`."""

    def __init__(self, cfg: ExperimentConfig, fold: int, run_dir: Path, k: int, ctx: distributed.DistContext,
                 console: Any) -> None:
        from cttrain.data import VolumeDataset
        from cttrain.reader import StoreReader, fold_rows

        self.cfg, self.fold, self.k, self.ctx, self.console = cfg, fold, k, ctx, console
        self.paths = FoldPaths(Path(run_dir), fold)
        self.reader = StoreReader(cfg.data.cache, cfg.data.channels or None)
        self.train_rows, self.val_rows, self.skipped = fold_rows(self.reader, fold, k)
        if len(self.train_rows) == 0 or len(self.val_rows) == 0:
            from ctprep.folds import FoldError

            raise FoldError(f"{cfg.data.cache}: fold {fold} has {len(self.train_rows)} training and "
                            f"{len(self.val_rows)} validation volumes written; both must be > 0")
        d = cfg.data
        cpu_aug = cfg.augment if cfg.augment.backend == "albumentations" else None
        self.train_ds = VolumeDataset(self.reader, self.train_rows, d.slices, d.slice_stride, train=True,
                                      seed=cfg.training.seed, cpu_augment=cpu_aug)
        self.val_ds = VolumeDataset(self.reader, self.val_rows, d.slices, d.slice_stride, train=False,
                                    seed=cfg.training.seed)
        self.label_names = list(self.reader.label_names)
        self.in_channels = int(self.reader.image_shape[1])
        self.offsets, self.prior = None, None
        if cfg.model.floor_prior:
            from ctprep.store import open_store
            from cttrain.prior import fold_offsets

            # the floor's model on this fold's training rows (cross-fitted there), see cttrain/prior.py
            self.offsets, self.prior = fold_offsets(cfg.data.cache, open_store(cfg.data.cache).windows,
                                                    self.train_rows, self.val_rows, seed=cfg.training.seed)

    def loader(self, train: bool, epoch: int) -> Any:
        from cttrain.data import make_loader

        d = self.cfg.data
        # Training drops the incomplete last batch (reshuffled each epoch, so different volumes): a
        # batch of one volume breaks the head's BatchNorm and gives the noisiest step of the epoch.
        drop_last = train and len(self.train_rows) // self.ctx.world_size >= d.batch_size
        return make_loader(self.train_ds if train else self.val_ds, d.batch_size, train=train,
                           drop_last=drop_last, seed=self.cfg.training.seed, epoch=epoch if train else 0,
                           num_workers=d.num_workers, prefetch=d.prefetch,
                           pin_memory=d.pin_memory and self.ctx.device.type == "cuda",
                           rank=self.ctx.rank, world_size=self.ctx.world_size,
                           weighted_sampling=train and d.weighted_sampling)

    def bn_loader(self) -> Any:
        """The training rows, evaluation slices, no augmentation, every row on every rank
        (training.precise_bn: identical statistics on all ranks without a collective). The last
        incomplete batch is dropped: BatchNorm in train mode cannot take a batch of one volume."""
        from cttrain.data import eval_loader

        return eval_loader(self.reader, self.train_rows, self.cfg.data, seed=self.cfg.training.seed,
                           cuda=self.ctx.device.type == "cuda",
                           drop_last=len(self.train_rows) >= self.cfg.data.batch_size)

    def say(self, text: str) -> None:
        if self.console is not None and self.ctx.is_main:
            self.console.print(text, highlight=False)

    def meta(self, epoch: int) -> dict[str, Any]:
        from ctprep.config import to_dict

        meta = {"config": to_dict(self.cfg), "label_names": self.label_names, "in_channels": self.in_channels,
                "channels": list(self.reader.channel_names), "fold": self.fold, "k": self.k, "epoch": epoch}
        if self.prior is not None:
            meta["floor_prior"] = self.prior.state()
        return meta


def train_fold(cfg: ExperimentConfig, fold: int, run_dir: Path, *, k: int, resume: bool = False,
               console: Any = None, progress: bool = True) -> dict:
    """Train on the other folds, validate on `fold` (of `k`); returns the results/fold_{fold}.json dict.

    `resume=True` continues from last.ckpt (or returns the finished fold's result without training).
    Under torchrun (RANK/WORLD_SIZE set) every rank calls this; only rank 0 writes files."""
    from ctprep.config import to_dict

    ctx = distributed.setup(cfg.training.device, backend=cfg.training.ddp_backend)
    if console is None and progress and ctx.is_main:
        from rich.console import Console

        console = Console()
    paths = FoldPaths(Path(run_dir), fold)
    if resume and paths.result().is_file():
        return _finished_result(cfg, paths, fold, k)
    configure_determinism(cfg.training.deterministic)
    seed_everything(cfg.training.seed)
    run = FoldRun(cfg, fold, Path(run_dir), k, ctx, console)
    steps = -(-len(run.loader(True, 0)) // cfg.training.accumulate)
    pos_freq = run.reader.labels[run.train_rows].astype(np.float64).mean(axis=0)
    trainer = Trainer(cfg, in_channels=run.in_channels, num_labels=len(run.label_names), pos_freq=pos_freq,
                      steps_per_epoch=steps, ctx=ctx)
    if run.offsets is not None:
        trainer.set_offsets(run.offsets)
    state = FoldState()
    if resume and paths.last.is_file():
        state = _restore(run, trainer, to_dict(cfg))
    elif ctx.is_main:
        if resume:
            run.say(f"fold {fold}: nothing to resume ({paths.last} missing), starting from epoch 1")
        _clear_outputs(paths)
    distributed.barrier(ctx)
    log = FoldLog(paths.logs, enabled=ctx.is_main, start_epoch=state.epoch)
    display = ProgressDisplay(console if (progress and ctx.is_main) else None, fold, cfg.training.epochs)
    try:
        with display:
            _loop(run, trainer, state, log, display)
    finally:
        log.close()
    return _finish(run, trainer, state)


def _loop(run: FoldRun, trainer: Trainer, state: FoldState, log: FoldLog, display: ProgressDisplay) -> None:
    tc = run.cfg.training
    for epoch in range(state.epoch, tc.epochs):
        if state.stopped_early:
            break
        started = time.perf_counter()
        dropout = trainer.set_epoch(epoch)
        loader = run.loader(True, epoch)
        display.start_epoch(epoch, len(loader))
        stats = trainer.train_epoch(loader, epoch, on_step=display.step)
        loss_sum, samples, wait, seconds = distributed.all_reduce_sum(
            run.ctx, [stats.loss, stats.samples, stats.data_wait, stats.seconds])
        row: dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": loss_sum / run.ctx.world_size, "lr": stats.lr,
            "dropout": dropout,
            "samples_per_s": samples / max(seconds / run.ctx.world_size, 1e-9),
            "data_wait_frac": wait / max(seconds, 1e-9),
        }
        if (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs:
            row.update(_validate(run, trainer, state, epoch + 1))
        row["seconds"] = time.perf_counter() - started
        state.epoch = epoch + 1
        state.train_seconds += row["seconds"]
        log.write(row)
        display.end_epoch(row)
        if tc.early_stopping > 0 and state.bad_rounds >= tc.early_stopping:
            state.stopped_early = True
            run.say(f"fold {run.fold}: early stop after epoch {epoch + 1} (no AUROC gain in "
                    f"{tc.early_stopping} validations)")
        _save_last(run, trainer, state)


def _gather_val(run: FoldRun, trainer: Trainer) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique rows, logits) over all ranks: DistributedSampler pads by repeating rows."""
    rows, logits = trainer.evaluate(run.loader(False, 0))
    parts = [p for p in distributed.all_gather_object(run.ctx, (rows, logits)) if len(p[0])]
    all_rows = np.concatenate([p[0] for p in parts])
    all_logits = np.concatenate([p[1] for p in parts])
    uniq, first = np.unique(all_rows, return_index=True)
    return uniq, all_logits[first]


def _validate(run: FoldRun, trainer: Trainer, state: FoldState, epoch: int) -> dict[str, float]:
    import torch

    from cttrain.metrics import challenge_metrics

    if run.cfg.training.precise_bn:
        trainer.recalibrate_bn(run.bn_loader())
    rows, logits = _gather_val(run, trainer)
    if len(rows) != len(run.val_rows):
        raise TrainingError(f"validation returned {len(rows)} of {len(run.val_rows)} fold-{run.fold} volumes")
    y = run.reader.labels[rows].astype(np.float32)
    with torch.no_grad():
        val_loss = float(trainer.loss_fn(torch.from_numpy(logits).to(trainer.device),
                                         torch.from_numpy(y).to(trainer.device)))
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    metrics = challenge_metrics(y.astype(np.uint8), probs, run.label_names,
                                threshold=run.cfg.evaluation.threshold)
    auroc, f1 = float(metrics["macro"]["auroc"]), float(metrics["macro"]["f1"])
    better_auroc, better_f1 = state.update(auroc, f1, epoch)
    if better_auroc:
        state.best_metrics = metrics
    # evaluation.oof_epoch: the fold's result is its last validation (honest) or its best (optimistic)
    is_result = better_auroc if run.cfg.evaluation.oof_epoch == "best" else True
    if is_result:
        state.oof_epoch, state.oof_metrics = epoch, metrics
    if run.ctx.is_main:
        if is_result:
            _write_predictions(run, rows, probs, y)
        if better_auroc:
            _save_best(run, trainer, run.paths.best_auroc, epoch, metrics)
        if better_f1:
            _save_best(run, trainer, run.paths.best_f1, epoch, metrics)
    distributed.barrier(run.ctx)
    return {"val_loss": val_loss, "val_auroc": auroc, "val_f1": f1}


def _save_best(run: FoldRun, trainer: Trainer, path: Path, epoch: int, metrics: dict) -> None:
    from cttrain.metrics import jsonable

    payload = run.meta(epoch) | {"model": trainer.eval_model.state_dict(), "metrics": jsonable(metrics)}
    save_checkpoint(payload, path)


def _save_last(run: FoldRun, trainer: Trainer, state: FoldState) -> None:
    from cttrain.metrics import jsonable

    if run.ctx.is_main:
        fold_state = jsonable(asdict(state))
        train_state = trainer.state_dict() | {"rng": rng_state(), "fold_state": fold_state}
        payload = run.meta(state.epoch) | {"model": trainer.eval_model.state_dict(),
                                           "train_state": train_state}
        save_checkpoint(payload, run.paths.last)
    distributed.barrier(run.ctx)


def _restore(run: FoldRun, trainer: Trainer, cfg_dict: dict[str, Any]) -> FoldState:
    path = run.paths.last
    ckpt = load_checkpoint(path)  # to the CPU: RNG states live there; load_state_dict moves weights
    changed = resume_differences(ckpt, path, cfg_dict, in_channels=run.in_channels,
                                 label_names=run.label_names, fold=run.fold, k=run.k)
    if "train_state" not in ckpt:
        raise CheckpointError(f"{path}: holds no training state (not a last.ckpt)")
    if changed:
        run.say(f"[yellow]resume: config changed since the checkpoint: {'; '.join(changed)}[/yellow]")
    ts = ckpt["train_state"]
    try:
        trainer.load_state_dict(ts)
    except (KeyError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot restore the training state: {reason}") from None
    set_rng_state(ts["rng"])
    saved = dict(ts["fold_state"])
    state = FoldState(**{k: v for k, v in saved.items() if k in FoldState.__dataclass_fields__})
    if run.ctx.is_main:
        FoldLog.truncate(run.paths.logs, state.epoch)
    run.say(f"fold {run.fold}: resumed from {path} after epoch {state.epoch}")
    return state


def _clear_outputs(paths: FoldPaths) -> None:
    """A fresh (not resumed) run replaces an earlier run in the same directory: its results must not
    look current, and a later --resume must not continue its checkpoint."""
    for path in (paths.result(), paths.result("_predictions.csv"), paths.result("_labels.csv"),
                 paths.logs / "metrics.csv", paths.last, paths.best_auroc, paths.best_f1):
        path.unlink(missing_ok=True)


def _write_csv_atomic(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_predictions(run: FoldRun, rows: np.ndarray, probs: np.ndarray, y: np.ndarray) -> None:
    names = [run.reader.volume_names[r] for r in rows]
    _write_csv_atomic(run.paths.result("_predictions.csv"), ["VolumeName", "fold", *run.label_names],
                      [[n, run.fold, *(f"{p:.9g}" for p in ps)] for n, ps in zip(names, probs, strict=True)])
    _write_csv_atomic(run.paths.result("_labels.csv"), ["VolumeName", *run.label_names],
                      [[n, *(int(v) for v in ys)] for n, ys in zip(names, y, strict=True)])


def _finish(run: FoldRun, trainer: Trainer, state: FoldState) -> dict:
    from cttrain.metrics import jsonable

    result = jsonable({
        "fold": run.fold, "k": run.k, "best_epoch": state.best_epoch, "best_f1_epoch": state.best_f1_epoch,
        "epochs_run": state.epoch, "stopped_early": state.stopped_early,
        "best_val_auroc": state.best_auroc, "best_val_f1": state.best_f1,
        # the fold's result is the validation evaluation.oof_epoch names; best_val_auroc the maximum
        "oof_epoch": state.oof_epoch, "oof_rule": run.cfg.evaluation.oof_epoch,
        "metrics": state.oof_metrics if state.oof_metrics is not None else state.best_metrics,
        "n_train": len(run.train_rows), "n_val": len(run.val_rows),
        "skipped_unwritten": int(run.skipped), "label_names": run.label_names,
        "channels": list(run.reader.channel_names), "train_seconds": round(state.train_seconds, 3),
        "device": str(run.ctx.device), "world_size": run.ctx.world_size,
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype is not None else "off",
        "checkpoint": str(run.paths.best_auroc),
    })
    result = distributed.broadcast_object(run.ctx, result)  # rank 0's timings, the same dict everywhere
    if run.ctx.is_main:
        path = run.paths.result()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        macro = (result.get("metrics") or {}).get("macro", {})
        best = float("nan") if state.best_auroc is None else state.best_auroc
        run.say(f"fold {run.fold}: macro AUROC {macro.get('auroc', float('nan')):.4f} at epoch {state.oof_epoch} "
                f"({run.cfg.evaluation.oof_epoch}; best {best:.4f} at epoch {state.best_epoch}) -> {path}")
    distributed.barrier(run.ctx)
    return result


def _finished_result(cfg: ExperimentConfig, paths: FoldPaths, fold: int, k: int) -> dict:
    """A finished fold's result; the checkpoint must still match the model/data setup asked for."""
    from ctprep.config import to_dict

    result = json.loads(paths.result().read_text(encoding="utf-8"))
    if paths.last.is_file():
        ckpt = load_checkpoint(paths.last)
        resume_differences(ckpt, paths.last, to_dict(cfg), in_channels=int(ckpt["in_channels"]),
                           label_names=list(ckpt["label_names"]), fold=fold, k=k)
    return result


__all__ = ["CheckpointError", "FoldPaths", "FoldState", "TrainingError", "load_model_from_checkpoint",
           "predict_probs", "train_fold"]
