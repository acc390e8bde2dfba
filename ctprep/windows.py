"""HU windows as uint8 channels, then CLAHE per slice and channel.

A window (center c, width w) maps HU linearly onto grey levels:
uint8 = round(clip((hu - (c - w/2)) / w, 0, 1) * 255). Several windows of the same slice
become the channels of one image (lung, mediastinum, wide), the way radiologists read chest CT.

CLAHE: contrast-limited adaptive histogram equalisation (K. Zuiderveld, "Contrast Limited
Adaptive Histogram Equalization", Graphics Gems IV, 1994), OpenCV's implementation, applied to
each 2D slice of each channel; a clip limit of 0 disables it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class WindowLike(Protocol):
    name: str
    center: float
    width: float


def window_bounds(center: float, width: float) -> tuple[float, float]:
    """HU range [lo, hi] that maps onto grey levels [0, 255]."""
    return center - width / 2.0, center + width / 2.0


def window_reference(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """The window formula written out in float64 numpy (slow; the definition tests compare to)."""
    lo, _ = window_bounds(center, width)
    return np.rint(np.clip((hu.astype(np.float64) - lo) / width, 0.0, 1.0) * 255.0).astype(np.uint8)


def window_to_uint8(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """uint8 window of a float32 HU array (any shape), one SIMD pass.

    cv2.addWeighted with an 8-bit output computes alpha * hu + beta in float and saturates with
    round-to-nearest, which is exactly clip-then-round of the window formula."""
    import cv2

    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo, _ = window_bounds(center, width)
    alpha = 255.0 / width
    src = np.ascontiguousarray(hu, dtype=np.float32)
    flat = src.reshape(-1, src.shape[-1]) if src.ndim >= 2 else src.reshape(1, -1)
    out = cv2.addWeighted(flat, alpha, flat, 0.0, -lo * alpha, dtype=cv2.CV_8U)
    return out.reshape(hu.shape)


def windows_to_channels(hu: np.ndarray, windows: Sequence[WindowLike]) -> np.ndarray:
    """(D, H, W) HU -> (D, C, H, W) uint8, channels in `windows` order."""
    if hu.ndim != 3:
        raise ValueError(f"expected a (D, H, W) HU volume, got shape {hu.shape}")
    depth, height, width = hu.shape
    images = np.empty((depth, len(windows), height, width), np.uint8)
    for c, window in enumerate(windows):
        images[:, c] = window_to_uint8(hu, window.center, window.width)
    return images


def apply_clahe(images: np.ndarray, clip_limit: float, tiles: int) -> np.ndarray:
    """CLAHE on every (H, W) slice of a (..., H, W) uint8 array, in place; returns it.

    `clip_limit` 0 disables CLAHE (the array is returned unchanged)."""
    import cv2

    if images.dtype != np.uint8:
        raise ValueError(f"CLAHE needs uint8 images, got {images.dtype}")
    if clip_limit <= 0 or images.size == 0:
        return images
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tiles), int(tiles)))
    for index in np.ndindex(images.shape[:-2]):
        images[index] = clahe.apply(images[index])
    return images
