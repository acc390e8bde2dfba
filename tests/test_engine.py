"""The training engine of one fold: schedule, optimiser groups, AMP choice, EMA, the files a fold
writes, determinism, early stopping, augmentation seeding and the progress display.

`make_store` / `tiny_cfg` are shared with test_checkpoint, test_resume and test_ddp: a 20-volume
store of (8, 3, 32, 32) uint8 volumes whose three labels are bright quadrants (learnable), five
folds of four volumes, and a `tiny` backbone of width 8 trained on CPU in about a second an epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ctprep.config import PreprocessConfig
from ctprep.store import create_store
from cttrain.config import ExperimentConfig, load_config
from cttrain.schedule import WarmupCosineRestarts, lr_at

torch.set_num_threads(1)

LABELS = ["Cardiomegaly", "Emphysema", "Lung nodule"]


def make_store(path: Path, n: int = 20, shape: tuple[int, int, int] = (8, 32, 32)) -> Path:
    """Volume i has labels (i % 2, i//2 % 2, i//4 % 2), each shown as a bright quadrant; fold = i % 5."""
    cfg = PreprocessConfig(shape=list(shape), chunk_slices=4, compressor="none")
    labels = np.array([[i % 2, (i // 2) % 2, (i // 4) % 2] for i in range(n)], dtype=np.uint8)
    store = create_store(path, volume_names=[f"train_{i}_a_1.nii.gz" for i in range(n)],
                         patient_ids=[f"train_{i}" for i in range(n)], labels=labels, label_names=LABELS,
                         cfg=cfg)
    rng = np.random.default_rng(0)
    d, h, w = shape
    corners = [(0, 0), (0, w // 2), (h // 2, 0)]
    for i in range(n):
        img = rng.integers(0, 60, (d, 3, h, w), dtype=np.uint8)
        for j, (y0, x0) in enumerate(corners):
            if labels[i, j]:
                img[:, :, y0:y0 + h // 2, x0:x0 + w // 2] += 120
        store.write_row(i, img, f"src{i}", {})
    store.write_folds(np.arange(n) % 5, {"k": 5, "seed": 0, "method": "test"})
    return path


def tiny_cfg(cache: Path, **sets: object) -> ExperimentConfig:
    base = [f"data.cache={cache}", "data.slices=4", "data.batch_size=4", "data.num_workers=0",
            "model.backbone=tiny", "model.tiny_width=8", "model.attention=none", "model.pooling=mean",
            "training.epochs=3", "training.lr=3e-3", "training.warmup_epochs=0", "training.device=cpu",
            "loss.name=bce", "augment.p_elastic=0"]
    return load_config(None, base + [f"{k}={v}" for k, v in sets.items()])


def read_metrics(run_dir: Path, fold: int = 0) -> list[dict[str, str]]:
    with (run_dir / "logs" / f"fold_{fold}" / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("engine") / "tiny.zarr")


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> tuple[Path, dict]:
    from cttrain.engine import train_fold

    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, train_fold(tiny_cfg(store), 0, run_dir, k=5, progress=False)


# ------------------------------------------------------------------------------------- schedule
def test_schedule_warms_up_linearly_then_follows_cosine_restarts():
    kw = dict(base_lr=1.0, steps_per_epoch=4, warmup_epochs=1, restart_epochs=2, min_lr=0.1)
    lrs = [lr_at(s, **kw) for s in range(4 + 16)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[4 + 8] == pytest.approx(1.0)  # restart every 2 epochs
    assert lrs[4 + 4] == pytest.approx(0.1 + 0.9 * 0.5)                      # half-way down the cosine
    assert min(lrs) >= 0.1 and all(a > b for a, b in zip(lrs[4:11], lrs[5:12], strict=True))


def test_schedule_restart_mult_doubles_the_period_and_resumes_from_the_step():
    kw = dict(base_lr=1.0, steps_per_epoch=2, warmup_epochs=0, restart_epochs=1, restart_mult=2, min_lr=0.0)
    restarts = [s for s in range(1, 30) if lr_at(s, **kw) > lr_at(s - 1, **kw)]
    assert restarts == [2, 6, 14]                 # periods of 1, 2, 4, 8 epochs (2 steps each)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = WarmupCosineRestarts(opt, steps_per_epoch=2, warmup_epochs=0, restart_epochs=1, restart_mult=2)
    for _ in range(5):
        sched.step()
    other = WarmupCosineRestarts(torch.optim.SGD(model.parameters(), lr=1.0), steps_per_epoch=2,
                                 warmup_epochs=0, restart_epochs=1, restart_mult=2)
    other.load_state_dict(sched.state_dict())
    assert other.get_last_lr() == sched.get_last_lr() == [pytest.approx(lr_at(5, **kw))]
    with pytest.raises(ValueError, match="steps per epoch"):
        WarmupCosineRestarts(opt, steps_per_epoch=3, warmup_epochs=0, restart_epochs=1).load_state_dict(
            sched.state_dict())


# ------------------------------------------------------------------------------- trainer parts
def test_no_weight_decay_on_biases_and_norm_weights():
    from cttrain.trainer import param_groups

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4} and {p.ndim for p in no_decay["params"]} == {1}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_amp_choice(monkeypatch):
    import contextlib

    from cttrain.trainer import resolve_amp

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [resolve_amp(m, cpu) for m in ("auto", "bf16", "fp16", "off")] == [(None, False)] * 4
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", cuda) == (torch.bfloat16, False)
    assert resolve_amp("fp16", cuda) == (torch.float16, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", cuda) == (torch.float16, True)   # fp16 needs the GradScaler
    assert resolve_amp("off", cuda) == (None, False)


def test_ema_moves_towards_the_live_weights():
    from cttrain.ema import ModelEMA

    model = torch.nn.Linear(2, 1)
    ema = ModelEMA(model, 0.5)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.module.weight, start + 0.9)
    assert not ema.module.weight.requires_grad


def test_train_step_steps_the_optimizer_only_at_the_end_of_a_group(store):
    from cttrain import distributed
    from cttrain.trainer import Trainer

    trainer = Trainer(tiny_cfg(store, **{"training.accumulate": 2}), in_channels=3, num_labels=3,
                      pos_freq=np.full(3, 0.5), steps_per_epoch=2, ctx=distributed.setup("cpu"))
    x, y = torch.rand(2, 4, 3, 32, 32), torch.ones(2, 3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss = trainer.train_step(x, y, group=2, sync=False)
    assert loss.ndim == 0 and not loss.requires_grad
    params = list(trainer.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))   # gradients only
    assert all(p.grad is not None for p in params)
    trainer.train_step(x, y, group=2, sync=True)
    assert trainer.scheduler.last_step == 1 and trainer.optimizer.state                # one optimizer step
    assert not all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(p.grad is None for p in params)                                       # zeroed for the next group


# --------------------------------------------------------------------------------- a whole fold
def test_fold_writes_every_contract_file(trained):
    run_dir, result = trained
    rows = read_metrics(run_dir)
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_auroc", "val_f1", "lr", "dropout",
                             "seconds", "samples_per_s", "data_wait_frac"]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert all(0.0 <= float(r["data_wait_frac"]) <= 1.0 and float(r["samples_per_s"]) > 0 for r in rows)
    assert all(math.isfinite(float(r["val_loss"])) and float(r["dropout"]) == 0.3 for r in rows)
    ckpts = run_dir / "checkpoints" / "fold_0"
    assert sorted(p.name for p in ckpts.iterdir()) == ["fold_0_best_auroc.ckpt", "fold_0_best_f1.ckpt",
                                                       "last.ckpt"]
    on_disk = json.loads((run_dir / "results" / "fold_0.json").read_text(encoding="utf-8"))
    assert on_disk == result
    assert result["n_train"] == 16 and result["n_val"] == 4 and result["skipped_unwritten"] == 0
    assert result["epochs_run"] == 3 and result["metrics"]["n"] == 4
    assert result["best_val_auroc"] == max(float(r["val_auroc"]) for r in rows)
    assert result["best_epoch"] == 1 + [float(r["val_auroc"]) for r in rows].index(result["best_val_auroc"])
    # the fold's result is its last validation (evaluation.oof_epoch=last), not the best one
    assert result["oof_epoch"] == 3 and result["oof_rule"] == "last"
    assert result["metrics"]["macro"]["auroc"] == pytest.approx(float(rows[-1]["val_auroc"]))
    assert result["metrics"]["macro"]["auroc"] > 0.6  # the quadrant signal is learnt


def test_oof_epoch_best_reports_the_best_validation(store, tmp_path):
    """evaluation.oof_epoch=best: the fold's result and prediction table are the epoch of highest
    validation AUROC (the optimistic rule, kept for comparison with earlier runs)."""
    from cttrain.engine import train_fold

    result = train_fold(tiny_cfg(store, **{"evaluation.oof_epoch": "best", "training.epochs": 3}), 0, tmp_path,
                        k=5, progress=False)
    rows = read_metrics(tmp_path)
    assert result["oof_rule"] == "best" and result["oof_epoch"] == result["best_epoch"]
    assert result["metrics"]["macro"]["auroc"] == pytest.approx(max(float(r["val_auroc"]) for r in rows))


def test_predictions_are_the_last_model_on_the_val_fold(trained, store):
    from cttrain.data import VolumeDataset, make_loader
    from cttrain.engine import load_model_from_checkpoint, predict_probs
    from cttrain.metrics import challenge_metrics
    from cttrain.reader import StoreReader

    run_dir, result = trained
    header, rows = read_table(run_dir / "results" / "fold_0_predictions.csv")
    assert header == ["VolumeName", "fold", *LABELS]
    assert [r[0] for r in rows] == [f"train_{i}_a_1.nii.gz" for i in (0, 5, 10, 15)]
    assert {r[1] for r in rows} == {"0"}
    probs = np.array([[float(v) for v in r[2:]] for r in rows])
    lheader, lrows = read_table(run_dir / "results" / "fold_0_labels.csv")
    assert lheader == ["VolumeName", *LABELS]
    y = np.array([[int(v) for v in r[1:]] for r in lrows])
    assert challenge_metrics(y, probs, LABELS)["macro"] == pytest.approx(result["metrics"]["macro"], abs=1e-6)

    last = run_dir / "checkpoints" / "fold_0" / "last.ckpt"
    model, cfg_dict = load_model_from_checkpoint(last, "cpu")
    assert cfg_dict["model"]["tiny_width"] == 8 and model.label_names == LABELS
    reader = StoreReader(store)
    ds = VolumeDataset(reader, np.array([0, 5, 10, 15]), 4, 2, train=False, seed=42)
    loader = make_loader(ds, 3, train=False, seed=42, epoch=0, num_workers=0, prefetch=2, pin_memory=False)
    got_rows, got = predict_probs(model, loader, "cpu")
    assert got_rows.tolist() == [0, 5, 10, 15]
    np.testing.assert_allclose(got, probs, atol=1e-6)


def test_same_seed_gives_identical_metrics(trained, store, tmp_path):
    from cttrain.engine import train_fold

    run_dir, result = trained
    again = train_fold(tiny_cfg(store), 0, tmp_path, k=5, progress=False)
    assert again["metrics"] == result["metrics"]
    cols = ["train_loss", "val_loss", "val_auroc", "val_f1", "lr"]
    table = [[r[c] for c in cols] for r in read_metrics(tmp_path)]
    assert table == [[r[c] for c in cols] for r in read_metrics(run_dir)]


def test_direct_shard_reads_train_exactly_as_zarr_reads(trained, store, tmp_path, monkeypatch):
    """The data path changes speed, not values: a fold trained with the reader forced onto zarr's
    own read path logs the same metrics and writes the same predictions as the direct reads."""
    from cttrain import reader as reader_module
    from cttrain.engine import train_fold

    run_dir, result = trained
    original = reader_module.StoreReader.__init__

    def through_zarr(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.direct = False

    monkeypatch.setattr(reader_module.StoreReader, "__init__", through_zarr)
    assert not reader_module.StoreReader(store).direct
    again = train_fold(tiny_cfg(store), 0, tmp_path, k=5, progress=False)
    assert again["metrics"] == result["metrics"]
    cols = ["train_loss", "val_loss", "val_auroc", "lr"]
    rows = [[r[c] for c in cols] for r in read_metrics(tmp_path)]
    assert rows == [[r[c] for c in cols] for r in read_metrics(run_dir)]
    mine = sorted(run_dir.rglob("*.csv"))
    theirs = {f.relative_to(tmp_path): f.read_bytes() for f in tmp_path.rglob("*.csv")}
    preds = [f for f in mine if "pred" in f.name]
    assert preds, "the fold wrote no prediction table"
    for f in preds:
        assert theirs[f.relative_to(run_dir)] == f.read_bytes(), f.name


def test_ema_accumulation_clipping_and_mixup(store, tmp_path):
    from cttrain.checkpoint import load_checkpoint
    from cttrain.engine import train_fold

    cfg = tiny_cfg(store, **{"training.epochs": 1, "training.ema": 0.9, "training.accumulate": 3,
                             "training.grad_clip": 0.5, "augment.mixup_alpha": 0.4, "augment.mixup_p": 1.0})
    result = train_fold(cfg, 0, tmp_path, k=5, progress=False)
    assert result["epochs_run"] == 1
    last = load_checkpoint(tmp_path / "checkpoints" / "fold_0" / "last.ckpt")
    ts = last["train_state"]
    assert ts["scheduler"]["last_step"] == 2         # 4 batches in groups of 3 -> 2 optimizer steps
    assert ts["ema"]["updates"] == 2
    for name, value in last["model"].items():        # the checkpointed model is the EMA copy
        assert torch.equal(value, ts["ema"]["module"][name])
    assert any(not torch.equal(last["model"][n], ts["model"][n]) for n in ts["model"])


def test_early_stopping_on_val_auroc(store, tmp_path, monkeypatch):
    import cttrain.metrics
    from cttrain.engine import FoldState, train_fold

    real = cttrain.metrics.challenge_metrics

    def flat(*args, **kwargs):
        out = real(*args, **kwargs)
        out["macro"]["auroc"] = 0.5                   # never improves after the first validation
        return out

    monkeypatch.setattr(cttrain.metrics, "challenge_metrics", flat)
    cfg = tiny_cfg(store, **{"training.epochs": 6, "training.early_stopping": 2})
    result = train_fold(cfg, 0, tmp_path, k=5, progress=False)
    assert result["epochs_run"] == 3 and result["stopped_early"] and result["best_epoch"] == 1
    assert len(read_metrics(tmp_path)) == 3

    state = FoldState()
    assert state.update(math.nan, 0.1, 1) == (True, True)   # the first validation is always "best"
    assert state.update(0.6, 0.0, 2) == (True, False)       # a number beats NaN
    assert state.update(math.nan, 0.2, 3) == (False, True) and state.bad_rounds == 1


def test_augment_seeding_and_albumentations_backend(store):
    from cttrain import distributed
    from cttrain.engine import FoldRun
    from cttrain.trainer import Trainer

    ctx = distributed.setup("cpu")
    cfg = tiny_cfg(store)
    trainer = Trainer(cfg, in_channels=3, num_labels=3, pos_freq=np.full(3, 0.5), steps_per_epoch=4, ctx=ctx)
    x, y = torch.rand(2, 4, 3, 32, 32), torch.ones(2, 3)
    a, b, c = (trainer._augment(x, y, e, s)[0] for e, s in ((1, 2), (1, 2), (1, 3)))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)

    alb = tiny_cfg(store, **{"augment.backend": "albumentations", "augment.mixup_alpha": 0.2})
    run = FoldRun(alb, 0, store.parent / "unused", 5, ctx, None)
    assert run.train_ds.cpu_augment is alb.augment and run.val_ds.cpu_augment is None
    alb_trainer = Trainer(alb, in_channels=3, num_labels=3, pos_freq=np.full(3, 0.5), steps_per_epoch=4,
                          ctx=ctx)
    assert alb_trainer.device_augment is None and alb_trainer.mix


def test_progress_display_and_epoch_summary(store, tmp_path):
    from rich.console import Console

    from cttrain.engine import train_fold

    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    train_fold(tiny_cfg(store, **{"training.epochs": 1}), 1, tmp_path, k=5, console=console, progress=True)
    text = out.getvalue()
    assert "fold 1 epoch 1/1" in text and "AUROC" in text and "vol/s" in text and "fold_1.json" in text


def test_fold_log_truncates_on_resume_and_feeds_tensorboard(tmp_path, monkeypatch):
    import sys
    import types

    from cttrain.progress import FoldLog

    calls: list[tuple] = []

    class FakeWriter:  # tensorboard is optional: stand in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    fake = types.SimpleNamespace(SummaryWriter=FakeWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = FoldLog(tmp_path, start_epoch=0)
    for epoch in (1, 2, 3):
        log.write({"epoch": epoch, "train_loss": 1.0 / epoch, "val_auroc": None, "lr": 1e-3})
    log.close()
    assert calls[0] == ("init", str(tmp_path), None)
    assert ("train_loss", 0.5, 2) in calls and not [c for c in calls if c[0] == "val_auroc"]
    assert FoldLog.truncate(tmp_path, 1) == 2
    with (tmp_path / "metrics.csv").open() as fh:
        assert [line.split(",")[0] for line in fh.read().splitlines()] == ["epoch", "1"]
    FoldLog(tmp_path, start_epoch=1).close()
    assert ("init", str(tmp_path), 2) in calls       # events after the checkpoint's epoch are purged


def test_a_last_training_batch_of_one_volume_is_dropped(tmp_path):
    from cttrain.checkpoint import load_checkpoint
    from cttrain.engine import train_fold

    store = make_store(tmp_path / "odd.zarr", n=21)  # fold 1 trains on 17 volumes: 4 batches of 4 + 1
    result = train_fold(tiny_cfg(store, **{"training.epochs": 1}), 1, tmp_path / "run", k=5, progress=False)
    assert result["n_train"] == 17 and result["epochs_run"] == 1
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "fold_1" / "last.ckpt")
    assert last["train_state"]["scheduler"]["last_step"] == 4
