"""Checkpoints are plain data loaded with weights_only=True: tampered, missing and corrupt files are
refused with a CheckpointError naming the file, a malicious pickle never runs, writes are atomic."""

from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import LABELS, make_store, tiny_cfg

from cttrain.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_from_checkpoint,
    resume_differences,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


@pytest.fixture(scope="module")
def last_ckpt(tmp_path_factory) -> Path:
    from cttrain.engine import train_fold

    root = tmp_path_factory.mktemp("ckpt")
    store = make_store(root / "tiny.zarr")
    cfg = tiny_cfg(store, **{"training.epochs": 1, "training.ema": 0.9})
    train_fold(cfg, 0, root / "run", k=5, progress=False)
    return root / "run" / "checkpoints" / "fold_0" / "last.ckpt"


class _Payload:
    """Unpickling this object would call open(marker, 'w'), creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_last_checkpoint_is_plain_data_with_the_full_training_state(last_ckpt):
    raw = torch.load(last_ckpt, weights_only=True)  # must not need the full unpickler
    assert raw["format"] == "cttrain-ckpt/1" and raw["epoch"] == 1 and raw["fold"] == 0 and raw["k"] == 5
    assert raw["label_names"] == LABELS and raw["in_channels"] == 3
    assert raw["config"]["model"]["backbone"] == "tiny" and isinstance(raw["config"], dict)
    ts = raw["train_state"]
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "fold_state"} <= set(ts)
    assert {"python", "numpy", "torch"} <= set(ts["rng"])
    assert ts["fold_state"]["epoch"] == 1 and ts["fold_state"]["best_auroc"] is not None
    assert {"bad_rounds", "best_f1", "best_epoch"} <= set(ts["fold_state"])
    assert not [p for p in last_ckpt.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_tampered_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"format": "cttrain-ckpt/1", "model": {}, "config": {}, "label_names": [], "in_channels": 1,
               "epoch": 0, "evil": _Payload(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    with pytest.raises(CheckpointError, match="refused to load.*GLOBAL io.open") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model_from_checkpoint(path)
    assert not marker.exists()


def test_missing_corrupt_and_foreign_checkpoints(tmp_path, last_ckpt):
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(tmp_path / "nope.ckpt")
    assert "nope.ckpt" in str(info.value)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        load_checkpoint(garbage)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last_ckpt.read_bytes()[: last_ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable.*|truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a cttrain checkpoint"):
        load_checkpoint(foreign)


def test_save_is_atomic_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c" / "last.ckpt"
    base = {"model": {"w": torch.ones(2)}, "config": {}, "label_names": ["a"], "in_channels": 1, "epoch": 1}
    save_checkpoint(base, path)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        save_checkpoint(base | {"epoch": 2, "bad": lambda: None}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))  # plain data: survives a weights-only load
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


def test_resume_compatibility(last_ckpt):
    from ctprep.config import to_dict

    ckpt = load_checkpoint(last_ckpt)
    cfg = ckpt["config"]
    kw = dict(in_channels=3, label_names=LABELS, fold=0, k=5)
    assert resume_differences(ckpt, last_ckpt, cfg, **kw) == []
    changed = to_dict(tiny_cfg(cfg["data"]["cache"], **{"training.ema": 0.9, "training.lr": 1e-3,
                                                         "training.epochs": 9}))
    assert resume_differences(ckpt, last_ckpt, changed, **kw) == ["training.lr: 0.003 -> 0.001"]
    wider = to_dict(tiny_cfg(cfg["data"]["cache"], **{"training.ema": 0.9, "model.tiny_width": 16}))
    with pytest.raises(CheckpointError, match="model.tiny_width: 8 -> 16") as info:
        resume_differences(ckpt, last_ckpt, wider, **kw)
    assert "last.ckpt" in str(info.value)
    with pytest.raises(CheckpointError, match="input channels"):
        resume_differences(ckpt, last_ckpt, cfg, **(kw | {"in_channels": 1}))
    with pytest.raises(CheckpointError, match="fold 0/5 -> 1/5"):
        resume_differences(ckpt, last_ckpt, cfg, **(kw | {"fold": 1}))


def test_model_from_checkpoint_reproduces_the_ema_weights(last_ckpt):
    model, cfg = load_model_from_checkpoint(last_ckpt, "cpu")
    ckpt = load_checkpoint(last_ckpt)
    assert not model.training and cfg == ckpt["config"] and model.in_channels == 3
    assert model.channels == ["lung", "mediastinum", "wide"] and model.label_names == LABELS
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["train_state"]["ema"]["module"][name])
    x = torch.rand(1, 4, 3, 32, 32)
    assert model(x).shape == (1, 3)
