"""Training-step benchmark: slices/s and the share of step time spent waiting for data.

The real training loop (`cttrain.trainer.Trainer.train_epoch`) over the real loader
(`StoreReader` -> `VolumeDataset` -> `make_loader`) from a store built from the CT-RATE-size bench
volumes. Only steady-state steps are timed: the loader's start-up (`iter` to the first batch:
forking workers, their first reads) is reported apart as `startup_s`, and the first `skip` steps
(default workers x prefetch, the batches the loader can have queued during start-up) are not
timed either. The window opens before step `skip` asks for its batch (after a device
synchronise) and closes when `train_epoch` returns (it synchronises). data-wait fraction = time
blocked on `next(batch)` in the window / window; slices/s = timed volumes x K / window.

- CPU: configs/demo.yaml (tiny CNN, 20 slices of 96 x 96), always.
- CUDA, when a GPU is visible: configs/default.yaml (ResNet-50 + CBAM, 32 slices of 256 x 256,
  bf16 autocast, channels_last), with torch.compile off and on. ImageNet weights cannot be
  downloaded here, so `model.pretrained=false` (same arithmetic).

A short warm-up epoch (a few steps; compilation happens there) precedes the timed epoch. Each run
says whether it ran deterministic (exact resume) or fast (cuDNN benchmark): `configure_determinism`.

    python bench/train_step.py --quick --json
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bench_data
import common
import numpy as np

DEMO = common.REPO / "configs" / "demo.yaml"
DEFAULT = common.REPO / "configs" / "default.yaml"


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30, quick 8)")
    p.add_argument("--skip", type=int, default=None, help="untimed steps before the timed ones (default: "
                   "workers x prefetch, at least 1)")
    p.add_argument("--volumes", type=int, default=None, help="volumes in the store (default 8, quick 4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 30)
    args.volumes = args.volumes or (4 if args.quick else 8)
    return args


def _dataset(reader: Any, exp: Any, volumes: int) -> Any:
    """`volumes` training items cycling over the store's rows (whole batches only)."""
    from cttrain.data import VolumeDataset

    rows = np.flatnonzero(reader.written)
    rows = np.tile(rows, math.ceil(volumes / len(rows)))[:volumes]
    cpu_aug = exp.augment if exp.augment.backend == "albumentations" else None
    return VolumeDataset(reader, rows, exp.data.slices, exp.data.slice_stride, train=True,
                         seed=exp.training.seed, cpu_augment=cpu_aug)


class SteadyState:
    """A loader wrapper that times start-up and the steady-state window of one `train_epoch`.

    `startup_s`: `iter(loader)` to the first batch. The window starts when step `skip` asks for its
    batch (after `sync`, so earlier queued device work is not charged to it); `wait_s` sums the time
    blocked on `next` inside the window."""

    def __init__(self, loader: Any, skip: int, sync: Callable[[], None]) -> None:
        if not 1 <= skip < len(loader):
            raise ValueError(f"skip must be in [1, {len(loader)}) for a {len(loader)}-step epoch, got {skip}")
        self.loader, self.skip, self.sync = loader, skip, sync
        self.startup_s = self.wait_s = 0.0
        self.window_start: float | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        start = time.perf_counter()
        it = iter(self.loader)
        for i in range(len(self.loader)):
            if i == self.skip:
                self.sync()
                self.window_start = time.perf_counter()
            asked = time.perf_counter()
            batch = next(it)
            got = time.perf_counter()
            if i == 0:
                self.startup_s = got - start
            elif i >= self.skip:
                self.wait_s += got - asked
            yield batch


def run(exp: Any, store: Path, steps: int, warmup_steps: int, skip: int | None = None) -> dict[str, Any]:
    """Warm-up epoch, then one epoch of `skip` untimed and `steps` timed optimiser steps."""
    import torch

    from cttrain.data import make_loader
    from cttrain.distributed import DistContext
    from cttrain.reader import StoreReader
    from cttrain.trainer import Trainer, configure_determinism

    device = torch.device(exp.training.device)
    reader = StoreReader(store, exp.data.channels or None)
    d = exp.data
    configure_determinism(exp.training.deterministic)
    pos_freq = reader.labels[reader.written].astype(np.float64).mean(axis=0)
    trainer = Trainer(exp, in_channels=reader.num_channels, num_labels=len(reader.label_names),
                      pos_freq=pos_freq, steps_per_epoch=steps, ctx=DistContext(0, 1, 0, device))

    def loader(volumes: int, epoch: int) -> Any:
        return make_loader(_dataset(reader, exp, volumes), d.batch_size, train=True, seed=exp.training.seed,
                           epoch=epoch, num_workers=d.num_workers, prefetch=d.prefetch,
                           pin_memory=d.pin_memory and device.type == "cuda")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if skip is None:
        skip = max(1, d.num_workers * d.prefetch)
    with common.stopwatch() as warm:
        trainer.train_epoch(loader(warmup_steps * d.batch_size, 0), 0)
    clock = SteadyState(loader((skip + steps) * d.batch_size, 1), skip, sync)
    stats = trainer.train_epoch(clock, 1)
    seconds = time.perf_counter() - clock.window_start
    volumes, k = steps * d.batch_size, d.slices
    return {
        "device": str(device), "steps": steps, "volumes": volumes, "skipped_steps": skip,
        "seconds": round(seconds, 3), "startup_s": round(clock.startup_s, 3),
        "slices_per_s": round(volumes * k / seconds, 2),
        "volumes_per_s": round(volumes / seconds, 3),
        "step_ms": round(1000 * seconds / steps, 1),
        "data_wait_frac": round(clock.wait_s / seconds, 4),
        "warmup_s": round(warm["s"], 2), "loss": round(stats.loss, 4),
        "deterministic": bool(exp.training.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "batch_size": d.batch_size, "slices": k, "shape": list(reader.image_shape),
        "num_workers": d.num_workers, "backbone": exp.model.backbone, "attention": exp.model.attention,
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype is not None else "off",
        "channels_last": trainer.channels_last, "compile": bool(exp.model.compile and device.type == "cuda"),
    }


def _experiment(config: Path, store: Path, sets: list[str], args: Any) -> Any:
    """The config with the bench's settings, then the user's `--set` overrides (which win)."""
    from cttrain.config import load_config

    extra = [f"data.num_workers={args.workers}"] if args.workers is not None else []
    return load_config(config, [f"data.cache={store}", *sets, *extra, *args.set])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.limit_threads(args.threads)
    device = common.resolve_device(args.device)
    data = bench_data.ensure_data(args.data, args.volumes, args.seed, args.scale)
    runs: dict[str, Any] = {}
    demo_store = common.ensure_store(data, args.data, DEMO, args.set)
    common.log(f"demo config on CPU: {args.steps} steps")
    exp = _experiment(DEMO, demo_store, ["training.device=cpu"], args)
    runs["demo_cpu"] = run(exp, demo_store, args.steps, warmup_steps=2, skip=args.skip)
    if device == "cuda":
        store = common.ensure_store(data, args.data, DEFAULT, args.set)
        for compiled in (False, True):
            common.log(f"default config on CUDA, compile={compiled}: {args.steps} steps")
            exp = _experiment(DEFAULT, store, ["training.device=cuda", "model.pretrained=false",
                                               f"model.compile={str(compiled).lower()}"], args)
            runs[f"default_cuda_compile_{'on' if compiled else 'off'}"] = run(exp, store, args.steps,
                                                                              warmup_steps=3, skip=args.skip)
    result = {"runs": runs, "device": device, "threads": args.threads, "quick": args.quick,
              "data": {"generator": data.generator, "scale": args.scale, "volumes": len(data.files)},
              "machine": common.machine_info()}
    rows = [(name, r["device"], f"{r['backbone']}+{r['attention']}", "x".join(map(str, r["shape"])),
             f"{r['batch_size']}x{r['slices']}", r["amp"], "deterministic" if r["deterministic"] else "fast",
             f"{r['slices_per_s']:.1f}", f"{r['step_ms']:.0f}", f"{100 * r['data_wait_frac']:.1f} %",
             f"{r['startup_s']:.2f}") for name, r in runs.items()]
    columns = ("run", "device", "model", "store DxCxHxW", "batch x K", "amp", "mode", "slices/s", "ms/step",
               "data wait", "start-up s")
    common.emit("train_step", result, args, rows, columns, f"training throughput, {args.threads} CPU threads")
    return result


if __name__ == "__main__":
    main()
