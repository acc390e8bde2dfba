"""Folds on several devices: one `cttrain fold` subprocess per device, each device taking the next
fold when it is free (`cttrain cv --devices 0,1`). Each fold's output goes to
RUN_DIR/logs/fold_k/cttrain.log; failed folds are reported together once the others finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def fold_command(run_dir: Path, fold: int, k: int, device: str, resume: bool) -> list[str]:
    """The subprocess that trains one fold on one device. Without `resume` the saved config is
    passed as `--config` so a stale checkpoint of an earlier run is not continued. The fold makes
    `device` its current CUDA device (`distributed.setup`), so nothing of it lands on GPU 0."""
    cmd = [sys.executable, "-m", "cttrain", "fold", str(fold), "--out", str(run_dir), "--folds", str(k)]
    cmd += ["--resume"] if resume else ["--config", str(run_dir / "config.yaml")]
    return cmd + ["--set", f"training.device={device}"]


def _start_fold(run_dir: Path, fold: int, k: int, device: str, resume: bool, command: Callable[..., list[str]],
                env: dict[str, str]) -> tuple[int, subprocess.Popen, Any, Path]:
    log = run_dir / "logs" / f"fold_{fold}" / "cttrain.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("w", encoding="utf-8")
    proc = subprocess.Popen(command(run_dir, fold, k, device, resume), stdout=handle, stderr=subprocess.STDOUT,
                            env=env)
    return fold, proc, handle, log


def run_parallel(run_dir: Path, folds: Sequence[int], devices: Sequence[str], *, k: int, resume: bool,
                 console: Any, command: Callable[..., list[str]] = fold_command, poll_s: float = 1.0) -> None:
    """Run folds as subprocesses, one per device at a time; a free device takes the next fold.

    Each fold's output goes to RUN_DIR/logs/fold_k/cttrain.log. Failed folds are reported together
    after the others finished (a CVError naming them and their logs)."""
    queue, running, failed = list(folds), {}, []
    env = dict(os.environ)
    if all(d == "cpu" for d in devices):  # CPU folds share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
    try:
        while queue or running:
            for slot, device in enumerate(devices):  # slots, so `cuda:0,cuda:0` runs two folds on one GPU
                if slot not in running and queue:
                    running[slot] = _start_fold(run_dir, queue.pop(0), k, device, resume, command, env)
                    console.print(f"fold {running[slot][0]}: started on {device} (log {running[slot][3]})")
            time.sleep(poll_s)
            for slot, (fold, proc, handle, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                handle.close()
                del running[slot]
                device = devices[slot]
                if proc.returncode == 0:
                    console.print(f"fold {fold}: finished on {device}")
                else:
                    failed.append(f"fold {fold} on {device} (exit {proc.returncode}, see {log})")
    finally:
        for _fold, proc, handle, _log in running.values():  # interrupted: stop the folds we started
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            handle.close()
    if failed:
        from cttrain.cv import CVError  # here, not at the top: cv imports this module

        raise CVError("failed: " + "; ".join(failed))
