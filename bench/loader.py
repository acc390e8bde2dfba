"""Loader benchmark: the same CT-RATE-size volumes through two pipelines that yield the same tensors.

(a) on the fly, as the pipeline this project replaces did: per sample, in DataLoader workers, read
    the .nii.gz, HU, resample, windows, CLAHE, pick K slices and augment them with albumentations.
    The preprocessing is ctprep's own (`ctprep.pipeline.preprocess_volume`, already optimised),
    so (a) is a faster baseline than the original pipeline; `cttrain.augment_cpu` augments.
(b) cached: stream K slices per volume from the ctprep store (`cttrain.data.VolumeDataset` +
    `make_loader`), move them to the device (`to_device`) and augment there (`DeviceAugment`).

Both end with x float (B, K, C, H, W) in [0, 1] on the device, for the same preprocess config, the
same K and stride and the same `augment` section (affine, elastic, blur, intensity, noise; MixUp is
left out of both: it is the same batch-level step whichever loader feeds it). Both use `--workers`
worker processes with one thread each, and `--threads` threads in the main process.

Timing: each pipeline is warmed up first (imports, albumentations set-up, one cached epoch); then
(a) passes once over every volume and (b) streams the same volumes `--epochs` times in one loader
(as in an epoch of a real data set, where the per-epoch worker start is paid once per thousands
of volumes). The store for (b) is built beforehand from the same files and not timed
(bench/build_cache.py times the build). `(b0)` is (b) without augmentation: the data path alone.

    python bench/loader.py --quick --json      # last stdout line: the JSON result
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import bench_data
import common
import numpy as np
import peer_monai
import read_probes

CONFIGS = common.REPO / "configs"
# The config meant for the device: demo.yaml is the CPU config (small inputs; augmentation then runs on
# the same cores as the loader workers), default.yaml the one-GPU CT-RATE config. Pass --config to
# measure the other one (BENCHMARKS.md reports both).
DEVICE_CONFIG = {"cpu": CONFIGS / "demo.yaml", "cuda": CONFIGS / "default.yaml"}


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None,
                   help="experiment YAML (preprocess, data.slices/slice_stride, augment); default: "
                        "configs/demo.yaml on CPU, configs/default.yaml on CUDA")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes, both pipelines")
    p.add_argument("--threads", type=int, default=None, help="main-process threads (default: --workers)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="volumes per batch (default: the config's data.batch_size)")
    p.add_argument("--volumes", type=int, default=None, help="volumes (default 8, quick 4)")
    p.add_argument("--epochs", type=int, default=None, help="cached and MONAI passes (default 40, quick 10)")
    p.add_argument("--no-monai", action="store_true", help="leave out the MONAI columns (bench/peer_monai.py)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.volumes = args.volumes or (4 if args.quick else 8)
    args.epochs = args.epochs or (10 if args.quick else 40)
    args.threads = args.threads or max(1, args.workers)
    return args


# ------------------------------------------------------------------------------ (a) on the fly


class OnTheFlyDataset:
    """One item per .nii.gz file: the whole preprocessing, slice choice and CPU augmentation."""

    def __init__(self, files: list[Path], metas: list[Any], labels: np.ndarray, exp: Any, seed: int) -> None:
        from cttrain.augment_cpu import build_cpu_augment

        self.files, self.metas, self.labels = files, metas, labels
        self.pre, self.data, self.seed = exp.preprocess, exp.data, seed
        self.augment = build_cpu_augment(exp.augment)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from ctprep.pipeline import preprocess_volume
        from cttrain.data import slice_indices

        rng = np.random.default_rng([self.seed, i])
        images = preprocess_volume(self.files[i], self.pre, self.metas[i]).images
        idx = slice_indices(images.shape[0], self.data.slices, self.data.slice_stride, True, rng)
        image = self.augment(np.ascontiguousarray(images[idx]), int(rng.integers(2**31)))
        target = torch.from_numpy(self.labels[i].astype(np.float32))
        return {"image": torch.from_numpy(image), "target": target, "row": i}


def _one_thread_worker(_worker_id: int) -> None:
    import cv2
    import SimpleITK as sitk
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


class _Indices:
    """A sampler whose index list the main process may change between passes (persistent workers)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Any:
        return iter(list(self.indices))

    def __len__(self) -> int:
        return len(self.indices)


def run_onthefly(data: bench_data.BenchData, exp: Any, args: Any, device: str) -> dict[str, Any]:
    """Spawned, persistent workers: forking after SimpleITK's or OpenCV's thread pools have run
    can deadlock the child, and a spawned worker's start-up (imports) must not count. A warm-up
    pass gives every worker one batch; the timed pass then reads each volume once."""
    from torch.utils.data import DataLoader

    from cttrain.data import to_device

    ds = OnTheFlyDataset(data.files, bench_data.volume_metas(data), bench_data.file_labels(data), exp, args.seed)
    sampler = _Indices()
    extra = {"worker_init_fn": _one_thread_worker, "multiprocessing_context": "spawn",
             "persistent_workers": True, "prefetch_factor": 2} if args.workers > 0 else {}
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, **extra)
    sampler.indices = list(range(min(len(ds), max(1, args.workers) * args.batch_size)))
    with common.stopwatch() as warm:
        for batch in loader:
            to_device(batch, device)
    sampler.indices = list(range(len(ds)))
    shape, count = None, 0
    start = time.perf_counter()
    for batch in loader:
        x, _y, _rows = to_device(batch, device)
        shape, count = tuple(x.shape[1:]), count + x.shape[0]
    common.sync(device)
    seconds = time.perf_counter() - start
    del loader  # stops the persistent workers
    return {"volumes": count, "seconds": round(seconds, 3), "volumes_per_s": count / seconds,
            "warmup_s": round(warm["s"], 3), "shape": list(shape)}


# ---------------------------------------------------------------------------------- (b) cached


def _cached_epoch(ds: Any, args: Any, device: str, aug: Any, epoch: int) -> tuple[int, tuple]:
    import torch

    from cttrain.data import make_loader, to_device

    loader = make_loader(ds, args.batch_size, train=True, seed=args.seed, epoch=epoch,
                         num_workers=args.workers, prefetch=2, pin_memory=device == "cuda")
    count, shape = 0, ()
    for step, batch in enumerate(loader):
        x, _y, _rows = to_device(batch, device)
        if aug is not None:
            x = aug(x, torch.Generator().manual_seed(args.seed * 100003 + epoch * 1009 + step))
        count, shape = count + x.shape[0], tuple(x.shape[1:])
    common.sync(device)
    return count, shape


def run_cached(store: Path, exp: Any, args: Any, device: str, augment: bool = True,
               epochs: int | None = None) -> dict[str, Any]:
    """Warm-up epoch over the store's rows, then ONE loader over the rows repeated `epochs` times:
    a real epoch holds thousands of volumes, so the per-epoch worker start (a few hundred ms
    here) must not be charged to a handful of volumes."""
    from cttrain.augment import DeviceAugment
    from cttrain.data import VolumeDataset
    from cttrain.reader import StoreReader

    reader = StoreReader(store, exp.data.channels or None)
    rows = np.flatnonzero(reader.written)
    epochs = epochs or args.epochs
    aug = DeviceAugment(exp.augment) if augment else None

    def dataset(times: int) -> Any:
        return VolumeDataset(reader, np.tile(rows, times), exp.data.slices, exp.data.slice_stride, train=True,
                             seed=args.seed)

    with common.stopwatch() as warm:
        _cached_epoch(dataset(1), args, device, aug, epoch=0)
    with common.stopwatch() as timed:
        count, shape = _cached_epoch(dataset(epochs), args, device, aug, epoch=1)
    return {"volumes": count, "seconds": round(timed["s"], 3), "volumes_per_s": count / timed["s"],
            "warmup_s": round(warm["s"], 3), "passes": epochs, "shape": list(shape),
            "store_rows": int(len(rows)), "augment": augment}


# ------------------------------------------------------------------------------- where time goes


def profile_stages(data: bench_data.BenchData, store: Path, exp: Any, args: Any, device: str,
                   volumes: int = 2) -> dict[str, dict[str, float]]:
    """Milliseconds per volume of each step of both pipelines, in this process, one volume at a
    time (batch of one): (a) the pipeline's own stage timings plus slice choice + albumentations
    and the float conversion; (b) the store read, the float conversion and DeviceAugment."""
    import torch

    from ctprep.pipeline import preprocess_volume
    from cttrain.augment import DeviceAugment
    from cttrain.augment_cpu import build_cpu_augment
    from cttrain.data import slice_indices
    from cttrain.reader import StoreReader

    metas, n = bench_data.volume_metas(data), min(volumes, len(data.files))
    cpu_aug, dev_aug = build_cpu_augment(exp.augment), DeviceAugment(exp.augment)
    k, stride = exp.data.slices, exp.data.slice_stride
    a: dict[str, float] = {}
    for i in range(n):
        rng = np.random.default_rng([args.seed, i])
        with common.stopwatch() as t_all:
            result = preprocess_volume(data.files[i], exp.preprocess, metas[i])
        for stage, sec in result.info["timings"].items():
            a[stage] = a.get(stage, 0.0) + sec
        a["other"] = a.get("other", 0.0) + t_all["s"] - sum(result.info["timings"].values())
        with common.stopwatch() as t:
            idx = slice_indices(result.images.shape[0], k, stride, True, rng)
            image = cpu_aug(np.ascontiguousarray(result.images[idx]), int(rng.integers(2**31)))
        a["albumentations"] = a.get("albumentations", 0.0) + t["s"]
        with common.stopwatch() as t:
            torch.from_numpy(image).to(device).float().div_(255.0)
            common.sync(device)
        a["to_float"] = a.get("to_float", 0.0) + t["s"]
    reader = StoreReader(store, exp.data.channels or None)
    b: dict[str, float] = {"store_read": 0.0, "to_float": 0.0, "device_augment": 0.0}
    reps = 4 * n
    for i in range(reps):
        rng = np.random.default_rng([args.seed, i])
        with common.stopwatch() as t:
            image = reader.read(i % reader.n, slice_indices(reader.depth, k, stride, True, rng))
        b["store_read"] += t["s"]
        with common.stopwatch() as t:
            x = torch.from_numpy(image)[None].to(device).float().div_(255.0)
            common.sync(device)
        b["to_float"] += t["s"]
        with common.stopwatch() as t:
            dev_aug(x, torch.Generator().manual_seed(i))
            common.sync(device)
        b["device_augment"] += t["s"]
    return {"onthefly_ms": {key: round(1000 * v / n, 1) for key, v in a.items()},
            "cached_ms": {key: round(1000 * v / reps, 1) for key, v in b.items()},
            "read": read_probes.read_speed(store, exp, args), "handoff": read_probes.handoff_cost(reader, exp, args)}


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from cttrain.config import load_config

    common.limit_threads(args.threads)
    device = common.resolve_device(args.device)
    if args.config is None:
        args.config = DEVICE_CONFIG["cuda" if str(device).startswith("cuda") else "cpu"]
    exp = load_config(args.config, args.set)
    args.batch_size = args.batch_size or exp.data.batch_size
    data = bench_data.ensure_data(args.data, args.volumes, args.seed, args.scale)
    store = common.ensure_store(data, args.data, args.config, args.set)
    common.log(f"(b) cached: {args.epochs} passes over {len(data.files)} volumes from {store.name}")
    cached = run_cached(store, exp, args, device)
    common.log("(b0) cached, no augmentation: the data path alone")
    bare = run_cached(store, exp, args, device, augment=False)
    monai = None
    if not args.no_monai and peer_monai.available():
        common.log(f"MONAI: PersistentDataset and CacheDataset over the same {len(data.files)} volumes")
        monai = peer_monai.run(data, exp, args, args.data)
    elif not args.no_monai:
        common.log("MONAI not installed: `pip install -e '.[bench]'` adds its columns")
    common.log(f"(a) on the fly: {len(data.files)} volumes from .nii.gz")
    onthefly = run_onthefly(data, exp, args, device)
    common.log("where time goes: each step, one volume at a time, in this process")
    stages = profile_stages(data, store, exp, args, device)
    common.log("checksum cost: the store's reads with and without crc32c")
    crc = read_probes.checksum_cost(store, exp, args, args.data)
    if cached["shape"] != onthefly["shape"]:
        raise SystemExit(f"error: output shapes differ: {cached['shape']} vs {onthefly['shape']}")
    result = {
        "cached_volumes_per_s": round(cached["volumes_per_s"], 3),
        "onthefly_volumes_per_s": round(onthefly["volumes_per_s"], 4),
        "speedup": round(cached["volumes_per_s"] / onthefly["volumes_per_s"], 2),
        "workers": args.workers,
        "shape": cached["shape"],
        "cached_noaug_volumes_per_s": round(bare["volumes_per_s"], 3),
        "speedup_noaug": round(bare["volumes_per_s"] / onthefly["volumes_per_s"], 2),
        "monai_persistent_volumes_per_s": None if monai is None else round(monai["persistent"]["volumes_per_s"], 3),
        "monai_cache_volumes_per_s": None if monai is None else round(monai["cache"]["volumes_per_s"], 3),
        "monai_first_epoch_s": None if monai is None else monai["persistent"]["first_epoch_s"],
        "store_read_mb_per_s": stages["read"]["delivered_mb_per_s"],
        "threads": args.threads, "batch_size": args.batch_size, "device": device, "quick": args.quick,
        "config": _shown(args.config), "set": args.set,
        "data": {"generator": data.generator, "scale": args.scale, "volumes": len(data.files),
                 "source_bytes": data.source_bytes},
        "cached": cached, "cached_noaug": bare, "onthefly": onthefly, "stages": stages, "checksum": crc,
        "monai": monai,
        "machine": common.machine_info(),
    }
    common.emit("loader", result, args, _rows(result), ("pipeline", "volumes", "seconds", "volumes/s"),
                f"loader: {args.workers} workers, {args.threads} main threads, {device}, "
                f"output (K,C,H,W) = {tuple(cached['shape'])}, batch {args.batch_size}")
    return result


def _monai_rows(m: dict[str, Any] | None) -> list[tuple[str, ...]]:
    if m is None:
        return [("MONAI: not measured (pip install -e '.[bench]')", "", "", "")]
    p, c = m["persistent"], m["cache"]
    return [
        (f"MONAI PersistentDataset (first pass {p['first_epoch_s']:.1f} s, {p['disk_bytes_per_volume'] / 1e6:.1f} MB "
         f"disk/volume; no augmentation {p['noaug_volumes_per_s']:.0f}/s)", str(p["volumes"]), f"{p['seconds']:.2f}",
         f"{p['volumes_per_s']:.2f}"),
        (f"MONAI CacheDataset (fill {c['fill_s']:.1f} s, {c['ram_bytes_per_volume'] / 1e6:.1f} MB RAM/volume)",
         str(c["volumes"]), f"{c['seconds']:.2f}", f"{c['volumes_per_s']:.2f}"),
    ]


def _shown(path: Path) -> str:
    full = Path(path).resolve()
    return str(full.relative_to(common.REPO)) if full.is_relative_to(common.REPO) else str(path)


def _rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    a, b, b0 = r["onthefly"], r["cached"], r["cached_noaug"]
    rows = [
        ("(a) on the fly: nii.gz + preprocess + albumentations", str(a["volumes"]), f"{a['seconds']:.2f}",
         f"{a['volumes_per_s']:.3f}"),
        ("(b) cached: store + to_device + DeviceAugment", str(b["volumes"]), f"{b['seconds']:.2f}",
         f"{b['volumes_per_s']:.2f}"),
        ("(b0) cached, no augmentation", str(b0["volumes"]), f"{b0['seconds']:.2f}",
         f"{b0['volumes_per_s']:.2f}"),
        *_monai_rows(r.get("monai")),
        ("speedup (b)/(a)", "", "", f"{r['speedup']:.1f}x"),
        ("speedup (b0)/(a)", "", "", f"{r['speedup_noaug']:.1f}x"),
    ]
    for side, key in (("(a)", "onthefly_ms"), ("(b)", "cached_ms")):
        steps = r["stages"][key]
        text = ", ".join(f"{k} {v:.0f}" for k, v in steps.items())
        rows.append((f"{side} ms per volume, one thread: {text}", "", "", f"{sum(steps.values()):.0f} ms"))
    rd, h = r["stages"]["read"], r["stages"]["handoff"]
    rows.append((f"store read, one thread, per window: {rd['direct_ms']:.2f} ms direct "
                 f"({rd['decoded_mb_per_s']:.0f} MB/s decoded), {rd['zarr_ms']:.2f} ms through zarr", "", "",
                 f"{rd['delivered_mb_per_s']:.0f} MB/s"))
    rows.append((f"worker hand-off, ms per batch: stack {h['stack_ms']:.2f}, into new shared memory "
                 f"{h['shared_stack_ms']:.2f}", "", "", ""))
    c = r["checksum"]
    rows.append((f"store read, ms per window: {c['with_crc32c_ms']:.2f} with crc32c, {c['without_ms']:.2f} "
                 "without", "", "", f"{c['cost_pct']:+.1f} %"))
    return rows


if __name__ == "__main__":
    main()
