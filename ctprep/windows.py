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


def body_mask(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """(D, H, W) bool: inside the patient, per slice.

    Voxels above `threshold_hu` (soft tissue and bone, not air or lung), opened with a 3x3 kernel
    (cuts the table top and thin cables off the body), keeping components of at least 10 % of the
    slice's largest, with holes (lungs, airways, bowel gas) filled and one pixel of margin."""
    import cv2

    out = np.zeros(hu.shape, dtype=bool)
    kernel = np.ones((3, 3), np.uint8)
    for z in range(hu.shape[0]):
        tissue = cv2.morphologyEx((hu[z] > threshold_hu).astype(np.uint8), cv2.MORPH_OPEN, kernel)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=8)
        if n <= 1:
            continue
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = np.flatnonzero(areas >= 0.1 * areas.max()) + 1
        body = np.isin(labels, keep).astype(np.uint8)
        # fill holes: flood the background from the border; what stays unreached is inside
        flood = np.pad(body, 1)
        mask = np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8)
        cv2.floodFill(flood, mask, (0, 0), 1)
        filled = body | (1 - flood[1:-1, 1:-1])
        out[z] = cv2.dilate(filled, kernel).astype(bool)
    return out


def mask_outside_body(images: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Set every channel to 0 outside the body, in place (uint8 (D, C, H, W), body (D, H, W)).

    Why: outside air is not 0 in every window (the lung window puts -1000 HU at about 60 of 255),
    so without the mask air around the patient is indistinguishable by intensity from emphysema
    holes in the lung, and its amount (body size, field of view, table) varies between scans."""
    images *= body[:, None].astype(np.uint8)
    return images
