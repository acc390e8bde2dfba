"""Exact resume: a fold killed (SIGKILL) or crashed mid-run and resumed gives the figures of an
uninterrupted run (within 1e-6 on CPU) and never repeats an epoch in metrics.csv; a finished fold
returns its result without training; a different model setup is refused."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_engine import make_store, read_metrics, read_table, tiny_cfg

from cttrain.checkpoint import CheckpointError, load_checkpoint

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
COMPARED = ("train_loss", "val_loss", "val_auroc", "val_f1", "lr", "dropout")

# The child stretches each optimizer step with a sleep (numerics untouched) so that the kill,
# sent as soon as epoch 1's last.ckpt appears, lands inside epoch 2.
CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_engine import tiny_cfg
import cttrain.trainer as trainer
real_step = trainer.Trainer._optimizer_step
def slow_step(self):
    time.sleep(0.25)
    real_step(self)
trainer.Trainer._optimizer_step = slow_step
from cttrain.engine import train_fold
train_fold(tiny_cfg({store!r}), 0, {run!r}, k=5, progress=False)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("resume") / "tiny.zarr")


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> tuple[Path, dict]:
    from cttrain.engine import train_fold

    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, train_fold(tiny_cfg(store), 0, run_dir, k=5, progress=False)


def _numbers(obj: object, prefix: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        out: dict[str, float] = {}
        for key, value in obj.items():
            out.update(_numbers(value, f"{prefix}.{key}"))
        return out
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix: float(obj)}
    return {}


def assert_same_run(run_dir: Path, result: dict, ref_dir: Path, ref: dict) -> None:
    for key in ("best_epoch", "best_f1_epoch", "epochs_run", "n_train", "n_val", "stopped_early"):
        assert result[key] == ref[key], key
    got, want = _numbers(result["metrics"]), _numbers(ref["metrics"])
    assert got.keys() == want.keys() and len(want) > 20
    for key, value in want.items():
        assert math.isclose(got[key], value, abs_tol=1e-6), (key, got[key], value)
    rows, ref_rows = read_metrics(run_dir), read_metrics(ref_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # no epoch repeated or lost
    for row, ref_row in zip(rows, ref_rows, strict=True):
        for col in COMPARED:
            assert math.isclose(float(row[col]), float(ref_row[col]), abs_tol=1e-6), (row["epoch"], col)
    _, preds = read_table(run_dir / "results" / "fold_0_predictions.csv")
    _, ref_preds = read_table(ref_dir / "results" / "fold_0_predictions.csv")
    assert [p[0] for p in preds] == [p[0] for p in ref_preds]
    np.testing.assert_allclose(np.array([p[2:] for p in preds], float),
                               np.array([p[2:] for p in ref_preds], float), atol=1e-6)
    assert json.loads((run_dir / "results" / "fold_0.json").read_text(encoding="utf-8")) == result


def test_sigkill_during_epoch_two_then_resume_matches_an_uninterrupted_run(store, reference, tmp_path):
    from cttrain.engine import train_fold

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "fold_0" / "last.ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    code = CHILD.format(tests=str(TESTS), store=str(store), run=str(run_dir))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not last.exists():
            if proc.poll() is not None:
                pytest.fail(f"training subprocess exited early:\n{proc.stdout.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no last.ckpt after 180 s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(last)["epoch"] == 1 and not (run_dir / "results" / "fold_0.json").exists()

    result = train_fold(tiny_cfg(store), 0, run_dir, k=5, resume=True, progress=False)
    ref_dir, ref = reference
    assert_same_run(run_dir, result, ref_dir, ref)


def test_crash_after_the_metrics_row_but_before_last_ckpt(store, reference, tmp_path, monkeypatch):
    import cttrain.engine as engine

    real_save = engine._save_last

    def crash_in_epoch_two(run, trainer, state):
        if state.epoch == 2:
            raise KeyboardInterrupt("simulated crash")
        real_save(run, trainer, state)

    monkeypatch.setattr(engine, "_save_last", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        engine.train_fold(tiny_cfg(store), 0, tmp_path, k=5, progress=False)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == ["1", "2"]  # the row of an unsaved epoch
    monkeypatch.setattr(engine, "_save_last", real_save)

    wider = tiny_cfg(store, **{"model.tiny_width": 16})
    with pytest.raises(CheckpointError, match="model.tiny_width: 8 -> 16"):
        engine.train_fold(wider, 0, tmp_path, k=5, resume=True, progress=False)

    result = engine.train_fold(tiny_cfg(store), 0, tmp_path, k=5, resume=True, progress=False)
    ref_dir, ref = reference
    assert_same_run(tmp_path, result, ref_dir, ref)


def test_resuming_a_finished_fold_returns_its_result_without_training(reference, store, monkeypatch):
    import cttrain.trainer

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold must not train again")

    monkeypatch.setattr(cttrain.trainer.Trainer, "train_epoch", no_training)
    monkeypatch.setattr(cttrain.trainer.Trainer, "__init__", no_training)
    ref_dir, ref = reference
    from cttrain.engine import train_fold

    assert train_fold(tiny_cfg(store), 0, ref_dir, k=5, resume=True, progress=False) == ref
    with pytest.raises(CheckpointError, match="model.backbone"):
        other = tiny_cfg(store, **{"model.backbone": "resnet18"})
        train_fold(other, 0, ref_dir, k=5, resume=True, progress=False)
