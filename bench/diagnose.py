"""Why does a model not learn? Five checks on one fold of a store, with the run's own config.

    python bench/diagnose.py --config configs/demo.yaml --cache STORE [--fold 0] [--set k=v ...]

1. alignment: every training batch's targets equal the store's labels of the rows it names
   (a shuffled or shifted label table would pass training silently and learn nothing);
2. input: per-channel mean/std of the normalised input (a constant or saturated window shows here);
3. overfit one batch: the model trained on a single batch (augmentation off) must drive its loss
   towards zero and its AUROC on that batch to 1; if not, the model or the loss cannot fit at all;
4. gradient norms per parameter group at the first step (dead or exploding parts of the network);
5. learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", WACV
   2017, https://arxiv.org/abs/1506.01186): the loss over steps with the learning rate growing
   exponentially from 1e-5 to 1; the steepest descent is a good maximum learning rate.

Prints a table per check and writes bench/results/diagnose.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def _loader(run, epoch: int = 0):
    return run.loader(True, epoch)


def check_alignment(run) -> dict:
    bad, seen = 0, 0
    train = set(int(r) for r in run.train_rows)
    for batch in _loader(run):
        rows = batch["row"].numpy()
        want = run.reader.labels[rows].astype(np.float32)
        bad += int((batch["target"].numpy() != want).any(axis=1).sum()) + int(sum(r not in train for r in rows))
        seen += len(rows)
    return {"volumes_checked": seen, "misaligned": bad}


def check_input(run, trainer) -> dict:
    from cttrain.data import to_device

    batch = next(iter(_loader(run)))
    x, _, _ = to_device(batch, trainer.device)
    b, k, c, h, w = x.shape
    z = trainer.model.input_norm(x.reshape(b * k, c, h, w))
    return {name: {"mean": round(float(z[:, i].mean()), 3), "std": round(float(z[:, i].std()), 3)}
            for i, name in enumerate(run.reader.channel_names)}


def overfit_one_batch(cfg, run, steps: int = 60) -> dict:
    from cttrain.data import to_device
    from cttrain.metrics import challenge_metrics
    from cttrain.trainer import Trainer

    cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, enabled=False))
    trainer = _trainer(cfg, run, Trainer)
    batch = next(iter(_loader(run)))
    x, y, _ = to_device(batch, trainer.device)
    losses = []
    trainer.model.train()
    for _ in range(steps):
        loss = trainer.loss_fn(trainer.model(x), y)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        losses.append(float(loss))
    trainer.model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(trainer.model(x)).numpy()
    m = challenge_metrics(y.numpy().astype(np.uint8), probs, run.label_names)
    return {"loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "auroc_on_batch": m["macro"]["auroc"], "steps": steps, "volumes": int(x.shape[0])}


def gradient_norms(cfg, run) -> dict:
    from cttrain.data import to_device
    from cttrain.trainer import Trainer

    trainer = _trainer(cfg, run, Trainer)
    x, y, _ = to_device(next(iter(_loader(run))), trainer.device)
    trainer.loss_fn(trainer.model(x), y).backward()
    groups: dict[str, float] = {}
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            key = ".".join(name.split(".")[:3])
            groups[key] = groups.get(key, 0.0) + float(p.grad.norm()) ** 2
    return {k: round(math.sqrt(v), 6) for k, v in groups.items()}


def lr_range_test(cfg, run, steps: int = 80, lo: float = 1e-5, hi: float = 1.0) -> dict:
    from cttrain.data import to_device
    from cttrain.trainer import Trainer

    trainer = _trainer(cfg, run, Trainer)
    trainer.model.train()
    lrs, losses, smooth = [], [], None
    it = iter(_loader(run))
    epoch = 0
    for i in range(steps):
        lr = lo * (hi / lo) ** (i / (steps - 1))
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            it = iter(_loader(run, epoch))
            batch = next(it)
        x, y, _ = to_device(batch, trainer.device)
        x, y = trainer._augment(x, y, epoch, i)
        loss = trainer.loss_fn(trainer.model(x), y)
        trainer.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.training.grad_clip or 1e9)
        trainer.optimizer.step()
        value = float(loss)
        smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
        lrs.append(lr)
        losses.append(smooth)
        if not math.isfinite(value) or (i > 10 and smooth > 4 * min(losses)):
            break
    slopes = np.diff(losses) / np.diff(np.log(lrs))
    best = int(np.argmin(slopes[5:])) + 5 if len(slopes) > 6 else int(np.argmin(losses))
    return {"steepest_lr": lrs[best], "min_loss_lr": lrs[int(np.argmin(losses))],
            "curve": [[round(a, 7), round(b, 5)] for a, b in zip(lrs, losses, strict=True)]}


def _trainer(cfg, run, trainer_cls):
    steps = max(1, len(_loader(run)))
    pos = run.reader.labels[run.train_rows].astype(np.float64).mean(axis=0)
    return trainer_cls(cfg, in_channels=run.in_channels, num_labels=len(run.label_names), pos_freq=pos,
                       steps_per_epoch=steps, ctx=run.ctx)


def main() -> None:
    from cttrain import distributed
    from cttrain.config import load_config
    from cttrain.cv import store_fold_count
    from cttrain.engine import FoldRun
    from cttrain.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default="bench/results/diagnose.json")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set, {"data.cache": args.cache})
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, device="cpu"))
    ctx = distributed.setup("cpu")
    run = FoldRun(cfg, args.fold, Path("/tmp"), store_fold_count(args.cache), ctx, None)
    result, start = {}, time.perf_counter()
    for name, fn in (("alignment", lambda: check_alignment(run)),
                     ("input", lambda: check_input(run, _trainer(cfg, run, Trainer))),
                     ("overfit_one_batch", lambda: overfit_one_batch(cfg, run)),
                     ("gradient_norms", lambda: gradient_norms(cfg, run)),
                     ("lr_range_test", lambda: lr_range_test(cfg, run))):
        t = time.perf_counter()
        result[name] = fn()
        value = result[name]
        shown = {k: v for k, v in value.items() if k != "curve"} if isinstance(value, dict) else value
        print(f"{name} ({time.perf_counter() - t:.1f} s): {json.dumps(shown)}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
