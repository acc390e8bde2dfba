"""Quality flags that make silent preprocessing failures loud.

The pipeline this project replaces rescaled images twice, so every pixel of every volume became
one constant and the model could only learn label frequencies (AUROC 0.45). Two checks catch
that family of bugs per volume:

- HU plausibility: a chest CT holds air (< -900 HU) and soft tissue (-100..100 HU). A volume
  still in raw scanner units (air ~ 0), or scaled to [0, 1], lacks air; one shifted by a wrong
  intercept lacks soft tissue.
- Window contrast: a window channel that is nearly constant (std < 2 grey levels, or > 99 % of
  pixels in one grey level) carries no information.

Flags are strings (`hu-no-air`, `hu-no-soft-tissue`, `constant-window:lung`, ...); build-cache
records them and decides whether to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

AIR_BELOW_HU = -900.0
SOFT_TISSUE_HU = (-100.0, 100.0)
MIN_FRACTION = 0.002           # 0.2 % of the subsample: a few thousand voxels of a real scan
CONSTANT_STD = 2.0             # grey levels
CONSTANT_MODE_FRACTION = 0.99
PERCENTILES = (0.5, 5.0, 25.0, 50.0, 75.0, 95.0, 99.5)
_MAX_VALUES = 250_000          # percentiles on a subsample: exact enough, a few ms


def hu_stats(sample_hu: np.ndarray) -> dict[str, Any]:
    """JSON-serialisable HU summary of a (sub)sample of a volume: percentiles and tissue fractions."""
    values = np.asarray(sample_hu, dtype=np.float32).ravel()
    if values.size == 0:
        return {"count": 0}
    if values.size > _MAX_VALUES:
        values = values[:: values.size // _MAX_VALUES]
    pct = np.percentile(values, PERCENTILES)
    lo, hi = SOFT_TISSUE_HU
    return {
        "count": int(values.size),
        "percentiles": {f"p{p:g}": round(float(v), 1) for p, v in zip(PERCENTILES, pct, strict=True)},
        "min": round(float(values.min()), 1),
        "max": round(float(values.max()), 1),
        "mean": round(float(values.mean(dtype=np.float64)), 1),
        "fraction_air": round(float(np.count_nonzero(values < AIR_BELOW_HU)) / values.size, 5),
        "fraction_soft_tissue": round(float(np.count_nonzero((values >= lo) & (values <= hi))) / values.size, 5),
    }


def check_hu(stats: dict[str, Any]) -> list[str]:
    """`hu-no-air` / `hu-no-soft-tissue` when the HU histogram is implausible for CT."""
    if not stats.get("count"):
        return ["hu-empty"]
    flags = []
    if stats["fraction_air"] < MIN_FRACTION:
        flags.append("hu-no-air")
    if stats["fraction_soft_tissue"] < MIN_FRACTION:
        flags.append("hu-no-soft-tissue")
    return flags


def check_windows(images: np.ndarray, window_names: Sequence[str]) -> list[str]:
    """`constant-window:NAME` for each channel of (D, C, H, W) uint8 images that is nearly constant."""
    if images.ndim != 4 or images.shape[1] != len(window_names):
        raise ValueError(f"expected (D, {len(window_names)}, H, W) images, got {images.shape}")
    flags = []
    step = 4 if min(images.shape[2:]) >= 64 else 1   # 1/16 of the pixels is plenty
    levels = np.arange(256, dtype=np.float64)
    for c, name in enumerate(window_names):
        hist = np.bincount(images[:, c, ::step, ::step].ravel(), minlength=256).astype(np.float64)
        total = hist.sum()
        if total == 0:
            flags.append(f"constant-window:{name}")
            continue
        mean = (hist @ levels) / total
        std = np.sqrt(max(0.0, (hist @ levels ** 2) / total - mean ** 2))
        if std < CONSTANT_STD or hist.max() / total > CONSTANT_MODE_FRACTION:
            flags.append(f"constant-window:{name}")
    return flags


def check_volume(hu_stats: dict[str, Any], images: np.ndarray, window_names: Sequence[str]) -> list[str]:
    """All QC flags of one preprocessed volume (empty list: nothing suspicious)."""
    return check_hu(hu_stats) + check_windows(images, window_names)
