"""What a fold's training reports while it runs: the rich progress display and the per-epoch log
(logs/fold_k/metrics.csv, plus TensorBoard events when the tensorboard package is installed).

metrics.csv gets one row per epoch, appended and fsynced as the epoch ends; a resumed run first cuts
it back to the checkpoint's epoch (`FoldLog.truncate`), so no epoch ever appears twice.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

COLUMNS: tuple[str, ...] = ("epoch", "train_loss", "val_loss", "val_auroc", "val_f1", "lr", "dropout",
                            "seconds", "samples_per_s", "data_wait_frac")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.8g}"
    return str(value)


class FoldLog:
    """Appends epoch rows to metrics.csv (and TensorBoard); a no-op on non-zero DDP ranks."""

    def __init__(self, directory: Path, *, enabled: bool = True, start_epoch: int = 0) -> None:
        self.path = Path(directory) / "metrics.csv"
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tb = _tensorboard(self.path.parent, start_epoch)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(COLUMNS)
            writer.writerow([_fmt(row.get(c)) for c in COLUMNS])
            fh.flush()
            os.fsync(fh.fileno())
        if self.tb is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    @staticmethod
    def truncate(directory: Path, epoch: int) -> int:
        """Keep the rows of epochs <= `epoch` (atomic rewrite); returns how many rows were dropped."""
        path = Path(directory) / "metrics.csv"
        if not path.is_file():
            return 0
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        keep = [r for r in rows if r.get("epoch", "").strip().isdigit() and int(r["epoch"]) <= epoch]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows([[r.get(c, "") or "" for c in COLUMNS] for r in keep])
        os.replace(tmp, path)
        return len(rows) - len(keep)


def _tensorboard(directory: Path, start_epoch: int) -> Any:
    """A SummaryWriter when tensorboard is installed (optional dependency), else None.

    `purge_step` drops the events a killed run wrote after its last checkpoint."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - ImportError, or a tensorboard too old for this torch
        return None
    return SummaryWriter(log_dir=str(directory), purge_step=start_epoch + 1 if start_epoch > 0 else None)


class ProgressDisplay:
    """A rich progress bar per epoch (step, loss, lr, samples/s) and a one-line epoch summary.

    With `console=None` every method is a no-op (tests, non-zero DDP ranks)."""

    def __init__(self, console: Any, fold: int, epochs: int) -> None:
        self.console, self.fold, self.epochs = console, fold, epochs
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> ProgressDisplay:
        if self.console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                           "{task.fields[sps]:.1f} vol/s"),
                TimeElapsedColumn(), console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"fold {self.fold} epoch {epoch + 1}/{self.epochs}", total=steps,
                                           loss=math.nan, lr=math.nan, sps=0.0)

    def step(self, step: int, steps: int, loss: float, lr: float, samples_per_s: float) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=step, loss=loss, lr=lr, sps=samples_per_s)

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self.console is None:
            return
        val = ""
        if row.get("val_auroc") is not None:
            val = f"  val loss {row['val_loss']:.4f}  AUROC {row['val_auroc']:.4f}  F1 {row['val_f1']:.4f}"
        self.console.print(f"fold {self.fold} epoch {row['epoch']}/{self.epochs}  "
                           f"loss {row['train_loss']:.4f}{val}  lr {row['lr']:.2e}  "
                           f"{row['samples_per_s']:.1f} vol/s  data wait {100 * row['data_wait_frac']:.0f}%  "
                           f"{row['seconds']:.1f}s", highlight=False)
