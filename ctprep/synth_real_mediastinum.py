"""The mediastinal structures of a real background (`ctprep.synth_real.analyse`): mediastinum,
heart and descending aorta, found by thresholds, convex hulls and connected components.

Arrays are (z, y, x) on the working grid, LPS, `spacing` (dz, dy, dx) in mm (as in synth_real).
"""

from __future__ import annotations

import numpy as np

from ctprep.synth_real import _components


def _mediastinum(hu, lungs, body, spine, mid_x, spacing) -> np.ndarray:
    """Per slice and row: between the right lung's medial edge and the left lung's (rows where both
    lungs are present; closed over 1 cm in y), not lung, in front of the back of the vertebral
    body. Row-wise rather than a convex hull, so the liver dome between the lung bases stays out."""
    from scipy import ndimage

    out = np.zeros(hu.shape, dtype=bool)
    xx = np.arange(hu.shape[2])[None, :]
    for z in range(hu.shape[0]):
        right, left = lungs[z] & (xx < mid_x[z]), lungs[z] & (xx >= mid_x[z])
        rows = right.any(axis=1) & left.any(axis=1)
        if rows.sum() < 3:
            continue
        xr = np.where(right.any(axis=1), hu.shape[2] - 1 - np.argmax(right[:, ::-1], axis=1), -1)
        xl = np.where(left.any(axis=1), np.argmax(left, axis=1), hu.shape[2])
        between = (xx > xr[:, None]) & (xx < xl[:, None]) & rows[:, None]
        between = ndimage.binary_closing(between, structure=np.ones((int(10 / spacing[1]) | 1, 1)))
        out[z] = between & ~lungs[z] & body[z]
        if np.isfinite(spine[z, 0]):
            out[z, int(spine[z, 0] + 5 / spacing[1]):] = False
    return out


def _hull_cavity(lungs: np.ndarray) -> np.ndarray:
    """Per slice, the convex hull of both lungs minus the lungs: mediastinum plus what the lung bases
    wrap around (the heart's front, the liver dome)."""
    import cv2

    out = np.zeros(lungs.shape, dtype=bool)
    for z in range(lungs.shape[0]):
        if lungs[z].sum() < 50:
            continue
        m = np.zeros(lungs.shape[1:], np.uint8)
        cv2.fillConvexPoly(m, cv2.convexHull(np.argwhere(lungs[z])[:, ::-1].astype(np.int32)), 1)
        out[z] = m.astype(bool) & ~lungs[z]
    return out


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = _components(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, np.arange(1, n + 1))
    return labels == int(np.argmax(sizes)) + 1


def _median3(hu: np.ndarray) -> np.ndarray:
    """3x3 in-plane median per slice (noise-robust tissue thresholds)."""
    import cv2

    return np.stack([cv2.medianBlur(np.ascontiguousarray(s), 3) for s in hu])


def _heart(hu, lungs, body, mediastinum, spine, mid_x, carina, spacing, contrast) -> np.ndarray:
    """Soft tissue (or contrast blood) from 2 cm below the carina down, in front of the spine.

    Two passes, because the heart touches the liver through the thin diaphragm: the core is the
    largest tissue component of the row-wise mediastinum (rows with lung on both sides never reach
    the liver, but miss the heart's front); the heart is then the largest tissue component inside
    the lungs' convex hull within the core's slices and its x range (+-1 cm), at most 65 mm right of
    the midline (the right atrium's border; the liver lies further right). The liver dome can still
    join below the heart's widest slice, so the heart is taken to reach as far below its widest
    slice as it reaches above it (its lowest centimetres may be lost; findings do not need them)."""
    from scipy import ndimage

    hi = 600 if contrast else 200
    tissue = body & (_median3(hu) > -30) & (hu < hi)
    tissue[max(0, carina[0] - int(20 / spacing[0])):] = False
    for z in range(hu.shape[0]):  # the heart lies in front of the spine and the descending aorta
        if np.isfinite(spine[z, 0]):
            tissue[z, int(spine[z, 0] - 30 / spacing[1]):] = False
    core = _largest(ndimage.binary_opening(tissue & mediastinum, iterations=2))
    if not core.any():
        return core
    zs, xs = np.flatnonzero(core.any(axis=(1, 2))), np.flatnonzero(core.any(axis=(0, 1)))
    margin = int(10 / spacing[2])
    limit = np.zeros(hu.shape, dtype=bool)
    limit[zs[0]: zs[-1] + 1, :, max(xs[0] - margin, 0): xs[-1] + margin + 1] = True
    xx = np.arange(hu.shape[2])[None, None, :]
    limit &= xx >= (mid_x - 65 / spacing[2])[:, None, None]
    heart = _largest(ndimage.binary_opening(tissue & _hull_cavity(lungs) & limit, iterations=2))
    area = heart.sum(axis=(1, 2))
    if area.max() > 0:
        widest, top = int(np.argmax(area)), int(np.flatnonzero(area)[-1])
        heart[: max(0, 2 * widest - top)] = False
    return ndimage.binary_closing(heart, iterations=2) & tissue


def _aorta(hu, mediastinum, lungs, spine, carina, spacing, contrast, lung_z) -> np.ndarray:
    """(z, 3): descending aorta (y, x, radius) per slice from the carina to the lung base: the disc of
    radius ~11 mm with the most soft tissue (or contrast blood) in a box left-front of the spine."""
    import cv2

    out = np.full((hu.shape[0], 3), np.nan)
    r = 11.0 / spacing[2]
    disc = np.zeros((int(2 * r) + 1,) * 2, np.float32)
    cv2.circle(disc, (int(r), int(r)), int(r), 1.0, -1)
    disc /= disc.sum()
    lo, hi = (100, 600) if contrast else (-10, 90)
    for z in range(lung_z[0], min(carina[0] + int(30 / spacing[0]) + 1, hu.shape[0])):
        if not np.isfinite(spine[z, 0]):
            continue
        sy, sx = spine[z]
        smooth = cv2.medianBlur(hu[z].astype(np.float32), 5)
        tissue = ((smooth > lo) & (smooth < hi) & ~lungs[z]).astype(np.float32)
        score = cv2.filter2D(tissue, -1, disc, borderType=cv2.BORDER_CONSTANT)
        y0, y1 = int(sy - 60 / spacing[1]), int(sy - 15 / spacing[1])
        x0, x1 = int(sx - 5 / spacing[2]), int(sx + 45 / spacing[2])
        box = score[max(y0, 0):max(y1, 1), max(x0, 0):max(x1, 1)]
        if box.size == 0 or box.max() < 0.6:
            continue
        j = np.unravel_index(int(np.argmax(box)), box.shape)
        out[z] = (max(y0, 0) + j[0], max(x0, 0) + j[1], r)
    good = np.isfinite(out[:, 0])
    if good.sum() >= 3:  # smooth the track: the aorta does not jump between slices
        zs = np.flatnonzero(good)
        for j in range(2):
            out[zs, j] = np.convolve(np.pad(out[zs, j], 2, mode="edge"), np.ones(5) / 5, mode="valid")
    return out
