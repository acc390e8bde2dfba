"""Augmentation benchmark: `cttrain.augment.DeviceAugment` (torch, whole batch) against its
albumentations counterpart `cttrain.augment_cpu` (per volume, as in a DataLoader worker) and
against Kornia (`kornia.augmentation` in a `VideoSequential` with `same_on_frame=True`: one draw
of parameters per volume, shared by its K slices, as DeviceAugment does), when Kornia is
installed (the `bench` extra).

The Kornia pipeline is the same list of transforms with the same ranges and probabilities:
RandomAffine (degrees, translate, scale; border padding), RandomHorizontalFlip, RandomElasticTransform,
RandomGaussianBlur, RandomBrightness/RandomContrast/RandomGamma, RandomGaussianNoise. What differs:
Kornia's elastic field is a per-pixel Gaussian-smoothed noise (ours a coarse grid upsampled), and
its intensity transforms draw separately (ours one step); the probabilities are the same.

Shapes and augmentation settings come from the configs: "demo" (configs/demo.yaml, batch 8) and
"default" (configs/default.yaml, batch 4): (B, K, C, H, W) with K = data.slices, C = windows and
H x W = preprocess.shape. Rows: the config's own mix of probabilities, then each transform alone
(probability 1, all others 0) so the two backends are compared step by step.

Units: volumes (samples of K slices) per second. The CPU backends run with `--threads` threads
(default 1: a DataLoader worker's share); albumentations goes uint8 -> uint8, DeviceAugment
float -> float on the device (the float conversion is not included on either side). On CUDA the
device is synchronised before each clock read.

    python bench/augment.py --quick --json
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import common
import numpy as np

SETS = {"demo": ("configs/demo.yaml", 8), "default": ("configs/default.yaml", 4)}
ALONE = {  # transform -> AugmentConfig changes that leave it alone at probability 1
    "affine": {"p_affine": 1.0},
    "elastic": {"p_elastic": 1.0},
    "blur": {"p_blur": 1.0},
    "intensity": {"p_intensity": 1.0},
    "noise": {"p_noise": 1.0},
}
_OFF = {"p_affine": 0.0, "p_elastic": 0.0, "p_blur": 0.0, "p_intensity": 0.0, "p_noise": 0.0, "hflip": 0.0}


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both backends (default 1)")
    p.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    p.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 3, quick 1)")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    return args


def _rate(fn: Any, volumes_per_call: int, min_seconds: float, device: str) -> float:
    """Volumes/s of `fn()`: one warm-up call, then calls until `min_seconds` have passed (>= 2)."""
    fn()
    common.sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    common.sync(device)
    return calls * volumes_per_call / (time.perf_counter() - start)


def measure(acfg: Any, shape: tuple[int, ...], device: str, min_seconds: float) -> dict[str, float]:
    import torch

    from cttrain.augment import DeviceAugment
    from cttrain.augment_cpu import build_cpu_augment

    b = shape[0]
    rng = np.random.default_rng(0)
    volumes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    cpu_aug, dev_aug = build_cpu_augment(acfg), DeviceAugment(acfg)
    seeds = iter(range(10**9))

    def cpu_call() -> None:
        for v in volumes:
            cpu_aug(v, next(seeds))

    x = torch.from_numpy(volumes).to(device).float().div_(255.0)
    out = {"albumentations_cpu": _rate(cpu_call, b, min_seconds, "cpu")}
    out[f"device_{device}"] = _rate(lambda: dev_aug(x, torch.Generator().manual_seed(next(seeds))), b,
                                    min_seconds, device)
    kornia = kornia_pipeline(acfg, shape[3], shape[4])
    if kornia is not None:
        out[f"kornia_{device}"] = _rate(lambda: kornia(x), b, min_seconds, device)
    if device == "cuda":  # the CPU figure of the device path too, for the table
        xc = x.cpu()
        out["device_cpu"] = _rate(lambda: dev_aug(xc, torch.Generator().manual_seed(next(seeds))), b,
                                  min_seconds, "cpu")
    return {k: round(v, 3) for k, v in out.items()}


def kornia_pipeline(acfg: Any, h: int, w: int) -> Any:
    """The config's augmentation as a Kornia VideoSequential over (B, K, C, H, W); None without Kornia."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    a = acfg
    steps = []
    if a.p_affine > 0:
        steps.append(K.RandomAffine(degrees=a.rotate_deg, translate=(a.translate, a.translate),
                                    scale=tuple(a.scale), padding_mode="border", p=a.p_affine))
    if a.hflip > 0:
        steps.append(K.RandomHorizontalFlip(p=a.hflip))
    if a.p_elastic > 0:
        steps.append(K.RandomElasticTransform(alpha=(a.elastic_alpha, a.elastic_alpha), p=a.p_elastic,
                                              padding_mode="border"))
    if a.p_blur > 0:
        radius = max(1, int(np.ceil(3.0 * max(a.blur_sigma))))
        steps.append(K.RandomGaussianBlur((2 * radius + 1, 2 * radius + 1), tuple(a.blur_sigma), p=a.p_blur))
    if a.p_intensity > 0:
        steps += [K.RandomBrightness((1 - a.brightness, 1 + a.brightness), p=a.p_intensity),
                  K.RandomContrast((1 - a.contrast, 1 + a.contrast), p=a.p_intensity),
                  K.RandomGamma(tuple(a.gamma), p=a.p_intensity)]
    if a.p_noise > 0:
        steps.append(K.RandomGaussianNoise(std=a.noise_std, p=a.p_noise))
    if not steps:
        return lambda x: x
    return K.VideoSequential(*steps, data_format="BTCHW", same_on_frame=True)


def _variants(acfg: Any) -> dict[str, Any]:
    out = {"config mix": acfg}
    for name, change in ALONE.items():
        out[f"{name} alone"] = dataclasses.replace(acfg, **{**_OFF, **change})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from cttrain.config import load_config

    common.limit_threads(args.threads)
    device = common.resolve_device(args.device)
    results: dict[str, Any] = {}
    for name in args.sets:
        path, batch = SETS[name]
        exp = load_config(common.REPO / path, args.set)
        d, h, w = exp.preprocess.shape
        shape = (batch, exp.data.slices, len(exp.preprocess.windows), h, w)
        common.log(f"{name}: shape {shape}")
        rows = {}
        for label, acfg in _variants(exp.augment).items():
            rows[label] = measure(acfg, shape, device, args.seconds)
        results[name] = {"config": path, "shape": list(shape), "volumes_per_s": rows}
    result = {"device": device, "threads": args.threads, "sets": results, "quick": args.quick,
              "machine": common.machine_info()}
    common.emit("augment", result, args, _rows(result), ("set / transform", "albumentations (CPU)",
                f"DeviceAugment ({device})", f"Kornia ({device})", "ours / Kornia"),
                f"augmentation, volumes/s, {args.threads} thread(s), device {device}")
    return result


def _rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name, s in r["sets"].items():
        for label, v in s["volumes_per_s"].items():
            cpu, dev = v["albumentations_cpu"], v[f"device_{r['device']}"]
            kor = v.get(f"kornia_{r['device']}")
            shape = "x".join(map(str, s["shape"]))
            rows.append((f"{name} {shape}: {label}", f"{cpu:.2f}", f"{dev:.2f}",
                         "-" if kor is None else f"{kor:.2f}", "-" if kor is None else f"{dev / kor:.2f}x"))
    return rows


if __name__ == "__main__":
    main()
