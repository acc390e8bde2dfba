"""DDP with two gloo processes on CPU (what `torchrun --nproc_per_node 2 -m cttrain fold 0` starts):
files are written once, by rank 0, and validation metrics cover every row of the fold even when
DistributedSampler pads the ranks' shares with repeated rows; a NaN loss on one rank stops both."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_engine import LABELS, make_store, read_metrics, read_table

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

RANK_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_engine import tiny_cfg
from cttrain import distributed
from cttrain.engine import train_fold
result = train_fold(tiny_cfg({store!r}, **{{"training.epochs": 2}}), 0, {run!r}, k=5, progress=False)
ctx = distributed.setup("cpu")
with open({out!r} + f"/rank{{ctx.rank}}.json", "w") as fh:
    json.dump({{"result": result, "rank": ctx.rank, "world": ctx.world_size}}, fh)
distributed.shutdown()
"""


# Rank 1 alone gets a NaN loss in its last training step of epoch 1 (2 steps per rank and epoch):
# rank 0's own losses stay finite, so only a check shared by both ranks can stop rank 0 too.
NAN_SCRIPT = """
import os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_engine import tiny_cfg
from cttrain import distributed
from cttrain.engine import train_fold
from cttrain.trainer import Trainer, TrainingError

init = Trainer.__init__
def poisoned(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if self.ctx.rank == 1:
        loss_fn, calls = self.loss_fn, [0]
        def loss(logits, y):
            calls[0] += 1
            value = loss_fn(logits, y)
            return value * float("nan") if calls[0] == 2 else value
        self.loss_fn = loss
Trainer.__init__ = poisoned
try:
    train_fold(tiny_cfg({store!r}, **{{"training.epochs": 2}}), 0, {run!r}, k=5, progress=False)
    message = "finished"
except TrainingError as exc:
    message = "TrainingError: " + str(exc)
finally:
    distributed.shutdown()
with open({out!r} + "/rank" + os.environ["RANK"] + ".txt", "w") as fh:
    fh.write(message)
"""


def _start_ranks(code: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0].decode())
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"DDP ranks did not finish in {timeout:.0f} s")
    return logs


def test_a_nan_loss_on_one_rank_stops_both_ranks_with_the_same_error(tmp_path):
    store = make_store(tmp_path / "tiny.zarr")
    out = tmp_path / "out"
    out.mkdir()
    started = time.monotonic()
    procs = _start_ranks(NAN_SCRIPT.format(tests=str(TESTS), store=str(store), run=str(tmp_path / "run"),
                                           out=str(out)))
    logs = _wait(procs, timeout=180)  # the process group's own timeout is 30 minutes
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    messages = [(out / f"rank{r}.txt").read_text(encoding="utf-8") for r in range(2)]
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("TrainingError: training loss became nan in epoch 1"), messages[0]
    assert time.monotonic() - started < 150
    assert not (tmp_path / "run" / "results" / "fold_0.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_write_once_and_score_the_whole_fold(tmp_path):
    from cttrain.data import VolumeDataset, make_loader
    from cttrain.engine import load_model_from_checkpoint, predict_probs
    from cttrain.metrics import challenge_metrics
    from cttrain.reader import StoreReader

    store = make_store(tmp_path / "tiny.zarr", n=21)  # fold 0 = rows 0, 5, 10, 15, 20: uneven over 2 ranks
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    procs = _start_ranks(RANK_SCRIPT.format(tests=str(TESTS), store=str(store), run=str(run_dir), out=str(out)))
    logs = _wait(procs, timeout=240)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)

    ranks = [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    result = ranks[0]["result"]
    assert ranks[1]["result"] == result                        # every rank returns the same figures
    assert result["world_size"] == 2 and result["n_val"] == 5 and result["metrics"]["n"] == 5
    metrics = read_metrics(run_dir)
    assert [r["epoch"] for r in metrics] == ["1", "2"]   # one row per epoch, not one per rank
    _, preds = read_table(run_dir / "results" / "fold_0_predictions.csv")
    assert [p[0] for p in preds] == [f"train_{i}_a_1.nii.gz" for i in (0, 5, 10, 15, 20)]
    ckpt_dir = run_dir / "checkpoints" / "fold_0"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["fold_0_best_auroc.ckpt", "fold_0_best_f1.ckpt",
                                                           "last.ckpt"]
    assert not [p for p in run_dir.rglob("*.tmp")]

    # The gathered validation equals a single-process evaluation of the saved best model.
    model, _ = load_model_from_checkpoint(ckpt_dir / "fold_0_best_auroc.ckpt", "cpu")
    reader = StoreReader(store)
    rows = np.array([0, 5, 10, 15, 20])
    loader = make_loader(VolumeDataset(reader, rows, 4, 2, train=False, seed=42), 4, train=False, seed=42,
                         epoch=0, num_workers=0, prefetch=2, pin_memory=False)
    _, probs = predict_probs(model, loader, "cpu")
    np.testing.assert_allclose(np.array([p[2:] for p in preds], float), probs, atol=1e-6)
    single = challenge_metrics(reader.labels[rows], probs, LABELS)
    assert single["macro"] == pytest.approx(result["metrics"]["macro"], abs=1e-6)
