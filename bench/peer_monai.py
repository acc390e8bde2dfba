"""The peer a user would pick instead of a ctprep store: MONAI's cached datasets, on the same files.

Same source volumes, same target (K, C, H, W) per volume, same workers and batch size as
`bench/loader.py`'s cached path, with MONAI's own transforms:

    LoadImaged (nibabel) -> EnsureChannelFirstd -> HU (the volume's slope/intercept, as ctprep
    applies them) -> Orientationd RAS -> Spacingd (the config's spacing) -> one
    ScaleIntensityRange per window, stacked as channels -> ResizeWithPadOrCropd (H, W, D)
    ---- cached up to here ----
    RandSpatialCropd (a window of (K-1)*stride+1 slices) -> every stride-th slice ->
    RandAffined (the config's p_affine, rotation, scale, translation; border padding) ->
    RandGaussianNoised (p_noise, noise_std) -> (K, C, H, W)

What is not equal (BENCHMARKS.md §1 says the same): MONAI has no CLAHE and no body crop (a
centre crop/pad instead), so its cached work per volume is smaller than ctprep's; its cache holds
float32 (C, H, W, D) volumes, ctprep's store uint8; its affine is a 3-D resampling of the K
slices (ours one 2-D warp shared by them). MONAI goes in the `bench` extra, not the core.

`PersistentDataset`: the first pass fills its disk cache (timed: `first_epoch_s`), later passes
read it back (`volumes_per_s`, steady); `disk_bytes_per_volume` is its cache folder / volumes.
`CacheDataset`: fills RAM once (`fill_s`, not in the rate), then `volumes_per_s`; `ram_bytes` is
what its cache holds. Passes run in one loader with persistent workers, so no per-pass worker
start is charged, as on the cached path.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import bench_data
import common
import numpy as np


def available() -> bool:
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError:
        return False
    return True


def _transform_base() -> type:
    """MONAI's Transform: PersistentDataset and CacheDataset cache every step up to the first one
    that is random OR not a MONAI Transform, so the steps written here must be Transforms."""
    try:
        from monai.transforms import Transform
    except ImportError:
        return object
    return Transform


class _HU(_transform_base()):
    """stored value * slope + intercept, from the item's own keys (deterministic: cached)."""

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d["image"] = d["image"] * float(d["slope"]) + float(d["intercept"])
        return d


class _Windows(_transform_base()):
    """One MONAI ScaleIntensityRange per window, concatenated as channels: (1, ...) -> (C, ...)."""

    def __init__(self, windows: list[Any]) -> None:
        from monai.transforms import ScaleIntensityRange

        self.scalers = [ScaleIntensityRange(a_min=w.center - w.width / 2, a_max=w.center + w.width / 2,
                                            b_min=0.0, b_max=1.0, clip=True) for w in windows]

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        import torch

        d = dict(d)
        d["image"] = torch.cat([s(d["image"]) for s in self.scalers], dim=0)
        return d


class _EveryStride(_transform_base()):
    """(C, H, W, span) -> (C, H, W, K): every stride-th slice of the random window."""

    def __init__(self, stride: int) -> None:
        self.stride = stride

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d["image"] = d["image"][..., :: self.stride]
        return d


class _SlicesFirst(_transform_base()):
    """(C, H, W, K) -> (K, C, H, W), the layout of the cached path's batches."""

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d["image"] = d["image"].permute(3, 0, 1, 2).contiguous()
        return d


def transforms(exp: Any, augment: bool = True) -> Any:
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandAffined,
        RandGaussianNoised,
        RandSpatialCropd,
        ResizeWithPadOrCropd,
        Spacingd,
    )

    pre, data, aug = exp.preprocess, exp.data, exp.augment
    d, h, w = pre.shape
    sz, sy, sx = pre.spacing
    k, stride = data.slices, data.slice_stride
    span = min(d, (k - 1) * stride + 1)
    steps = [
        LoadImaged(keys="image", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="image"),
        _HU(),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(sx, sy, sz), mode="bilinear"),
        _Windows(list(pre.windows)),
        ResizeWithPadOrCropd(keys="image", spatial_size=(h, w, d), mode="edge"),
        RandSpatialCropd(keys="image", roi_size=(h, w, span), random_size=False),
        _EveryStride(stride),
    ]
    if augment and aug.enabled:
        steps.append(RandAffined(keys="image", prob=aug.p_affine, rotate_range=(0.0, 0.0, math.radians(aug.rotate_deg)),
                                 scale_range=(aug.scale[1] - 1.0, aug.scale[1] - 1.0, 0.0),
                                 translate_range=(aug.translate * h, aug.translate * w, 0.0),
                                 padding_mode="border", mode="bilinear"))
        steps.append(RandGaussianNoised(keys="image", prob=aug.p_noise, std=aug.noise_std))
    steps.append(_SlicesFirst())
    return Compose(steps)


def _items(data: bench_data.BenchData) -> list[dict[str, Any]]:
    metas, labels = bench_data.volume_metas(data), bench_data.file_labels(data)
    return [{"image": str(f), "label": labels[i].astype(np.float32),
             "slope": 1.0 if m is None else m.slope, "intercept": 0.0 if m is None else m.intercept}
            for i, (f, m) in enumerate(zip(data.files, metas, strict=True))]


def _passes(dataset: Any, args: Any, passes: int, seed: int) -> tuple[int, float, list[int]]:
    """(volumes, seconds, item shape) of `passes` passes in one loader with persistent workers;
    the first batch (worker start) is not timed."""
    import torch
    from monai.data import DataLoader
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    extra = {"persistent_workers": True, "multiprocessing_context": "fork", "prefetch_factor": 2} \
        if args.workers > 0 else {}
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(seed), **extra)
    next(iter(loader))
    count, shape = 0, []
    start = time.perf_counter()
    for _ in range(passes):
        for batch in loader:
            x = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
            count, shape = count + x.shape[0], list(x.shape[1:])
    seconds = time.perf_counter() - start
    del loader
    set_determinism(seed=None)
    return count, seconds, shape


def run(data: bench_data.BenchData, exp: Any, args: Any, work: Path) -> dict[str, Any]:
    """PersistentDataset and CacheDataset figures (see the module docstring)."""
    import warnings

    from monai.data import CacheDataset, PersistentDataset

    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    items = _items(data)
    cache_dir = work / "monai-persistent"
    shutil.rmtree(cache_dir, ignore_errors=True)
    persistent = PersistentDataset(items, transforms(exp), cache_dir=cache_dir)
    with common.stopwatch() as first:            # fills the cache: every volume once, in the workers
        _passes(persistent, args, 1, args.seed)
    disk = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    n, sec, shape = _passes(persistent, args, args.epochs, args.seed)
    bare = PersistentDataset(items, transforms(exp, augment=False), cache_dir=cache_dir)
    n0, sec0, _ = _passes(bare, args, max(2, args.epochs // 2), args.seed)
    shutil.rmtree(cache_dir, ignore_errors=True)
    with common.stopwatch() as fill:
        cached = CacheDataset(items, transforms(exp), cache_rate=1.0, num_workers=max(1, args.workers),
                              progress=False)
    ram = sum(int(np.asarray(c["image"]).nbytes) for c in cached._cache)
    nc, secc, _ = _passes(cached, args, args.epochs, args.seed)
    return {
        "persistent": {"first_epoch_s": round(first["s"], 3), "volumes": n, "seconds": round(sec, 3),
                       "volumes_per_s": n / sec, "noaug_volumes_per_s": n0 / sec0,
                       "disk_bytes_per_volume": disk // len(items)},
        "cache": {"fill_s": round(fill["s"], 3), "volumes": nc, "seconds": round(secc, 3),
                  "volumes_per_s": nc / secc, "ram_bytes_per_volume": ram // len(items)},
        "shape": shape,
    }
