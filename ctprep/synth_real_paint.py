"""Painting primitives for findings on a real-anatomy background (`ctprep.synth_real`).

Everything works on the background's working grid, (z, y, x) voxels with `spacing` (dz, dy, dx) mm,
in HU. Shapes are evaluated on the bounding block of the object only; random fields are coarse
Gaussian noise upsampled to the block, so one random generator gives one shape on any grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ctprep.synth_real import Background


@dataclass(eq=False)
class Canvas:
    """The volume being painted (a copy of the background's HU) and masks findings may change."""

    bg: Background
    vol: np.ndarray
    heart: np.ndarray   # copies of the background's masks: an enlarged heart moves them
    lung: np.ndarray
    painted: dict[str, np.ndarray] = field(default_factory=dict)  # label -> voxels changed per slice

    @classmethod
    def of(cls, bg: Background) -> Canvas:
        return cls(bg, bg.hu.copy(), bg.heart.copy(), bg.lung.copy())

    def count(self, label: str, z: slice, mask: np.ndarray) -> int:
        """Record the `mask` voxels of a block starting at slice `z.start` as changed by `label`."""
        per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1)
        if label not in self.painted:
            self.painted[label] = np.zeros(self.vol.shape[0], dtype=np.int64)
        start = z.start or 0
        self.painted[label][start: start + len(per_slice)] += per_slice
        return int(per_slice.sum())

    def visible(self, label: str, z_lo: int, z_hi: int, min_voxels: int = 8) -> bool:
        """Whether `label` changed at least `min_voxels` voxels in slices [z_lo, z_hi)."""
        counts = self.painted.get(label)
        return counts is not None and int(counts[max(z_lo, 0): max(z_hi, 0)].sum()) >= min_voxels

    @property
    def spacing(self) -> np.ndarray:
        return np.asarray(self.bg.spacing, dtype=np.float64)


@dataclass(frozen=True)
class Block:
    """A box of the grid around a centre: index slices and mm offsets (dz, dy, dx) from the centre,
    broadcastable to the box."""

    sl: tuple[slice, slice, slice]
    dz: np.ndarray
    dy: np.ndarray
    dx: np.ndarray

    def r2(self, radii: tuple[float, float, float]) -> np.ndarray:
        """Squared normalised radius of an axis-aligned ellipsoid (z, y, x radii in mm)."""
        return (self.dz / radii[0]) ** 2 + (self.dy / radii[1]) ** 2 + (self.dx / radii[2]) ** 2

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dz.shape[0], self.dy.shape[1], self.dx.shape[2])


def block(cv: Canvas, center: np.ndarray | tuple, half_mm: tuple[float, float, float]) -> Block | None:
    """The box `center` (voxel z, y, x) +- `half_mm`, clipped to the grid; None if empty."""
    sp, shape = cv.spacing, cv.vol.shape
    sls, offs = [], []
    for a in range(3):
        lo = max(0, int(math.floor(center[a] - half_mm[a] / sp[a])))
        hi = min(shape[a], int(math.ceil(center[a] + half_mm[a] / sp[a])) + 1)
        if hi <= lo:
            return None
        sls.append(slice(lo, hi))
        offs.append(((np.arange(lo, hi) - center[a]) * sp[a]).astype(np.float32))
    return Block(tuple(sls), offs[0][:, None, None], offs[1][None, :, None], offs[2][None, None, :])


def field3(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, cell_mm: float,
           order: int = 3) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field on `shape` with correlation length ~`cell_mm`."""
    from scipy import ndimage

    coarse_shape = [max(2, int(math.ceil(n * s / cell_mm)) + 2) for n, s in zip(shape, spacing, strict=True)]
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    zoom = [n / c for n, c in zip(shape, coarse_shape, strict=True)]
    f = ndimage.zoom(coarse, zoom, order=order, mode="reflect", grid_mode=True)
    f = f[tuple(slice(0, n) for n in shape)]
    if f.shape != tuple(shape):  # zoom may round a dimension down by one
        f = np.pad(f, [(0, n - m) for n, m in zip(shape, f.shape, strict=True)], mode="edge")
    f -= f.mean()
    return f / (f.std() + 1e-6)


def paint(cv: Canvas, label: str, sl: tuple[slice, ...], mask: np.ndarray, value: float | np.ndarray) -> int:
    """Set `mask` voxels of the block `sl` to `value`; count them towards `label`."""
    mask = np.broadcast_to(mask, cv.vol[sl].shape)
    np.copyto(cv.vol[sl], np.asarray(value, dtype=np.float32), where=mask)
    return cv.count(label, sl[0], mask)


def lung_points(cv: Canvas, rng: np.random.Generator, n: int, *, zone: tuple[float, float] = (0.0, 1.0),
                depth_mm: tuple[float, float] = (0.0, 1e9), side: int = 0,
                posterior: float | None = None) -> np.ndarray:
    """n random lung voxels (rows z, y, x) between fractional heights `zone` (0 base, 1 apex), at an
    in-plane depth below the pleura in `depth_mm`, in lung `side` (1 right, 2 left, 0 either);
    `posterior` (0..1) keeps only the back part of the lung's depth (dependent regions)."""
    bg = cv.bg
    z0, z1 = bg.lung_z
    lo, hi = int(z0 + zone[0] * (z1 - z0)), int(z0 + zone[1] * (z1 - z0)) + 1
    sub = cv.lung[lo:hi] if side == 0 else (cv.lung[lo:hi] == side)
    ok = (sub > 0) & (bg.lung_depth[lo:hi] >= depth_mm[0]) & (bg.lung_depth[lo:hi] <= depth_mm[1])
    if posterior is not None:
        ys = np.arange(ok.shape[1])[None, :, None]
        rows = ok.any(axis=2, keepdims=True)
        first = np.argmax(rows, axis=1)[:, :, None]
        last = ok.shape[1] - 1 - np.argmax(rows[:, ::-1], axis=1)[:, :, None]
        ok &= ys >= first + (1 - posterior) * (last - first)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    pick = rng.choice(idx, size=min(n, idx.size), replace=False)
    pts = np.stack(np.unravel_index(pick, ok.shape), axis=1)
    pts[:, 0] += lo
    return pts


def tube(cv: Canvas, label: str, p0: np.ndarray, p1: np.ndarray, layers: list[tuple[float, float]],
         where: np.ndarray | None = None, only_below: float | None = None) -> int:
    """Concentric tube along the segment p0-p1 (voxel coordinates), `layers` = [(radius mm, HU), ...]
    outside in; `where` (full-size bool) restricts it; `only_below` paints only voxels darker than
    that HU (so a tube never overwrites bone or another bright object)."""
    sp = cv.spacing
    a, b = np.asarray(p0, float), np.asarray(p1, float)
    r = max(rad for rad, _ in layers)
    half = tuple(abs(b[i] - a[i]) / 2 * sp[i] + r + sp[i] for i in range(3))
    blk = block(cv, (a + b) / 2, half)
    if blk is None:
        return 0
    d = (b - a) * sp
    pz, py, px = blk.dz + d[0] / 2, blk.dy + d[1] / 2, blk.dx + d[2] / 2  # mm from p0 (block centre is the midpoint)
    t = np.clip((pz * d[0] + py * d[1] + px * d[2]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    dist2 = (pz - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (px - t * d[2]) ** 2
    total = 0
    for radius, hu in layers:
        mask = dist2 < radius * radius
        if where is not None:
            mask &= where[blk.sl]
        if only_below is not None:
            mask &= cv.vol[blk.sl] < only_below
        total += paint(cv, label, blk.sl, mask, hu)
    return total


def polyline(cv: Canvas, label: str, points: list[np.ndarray], layers: list[tuple[float, float]],
             **kwargs) -> int:
    return sum(tube(cv, label, a, b, layers, **kwargs) for a, b in zip(points[:-1], points[1:], strict=False))


def spot(cv: Canvas, label: str, c: np.ndarray, radius: float, hu: float) -> int:
    """A small bright sphere (calcification) that adds to what is there (max), so it never darkens."""
    blk = block(cv, c, (radius + 1,) * 3)
    if blk is None:
        return 0
    inside = blk.r2((radius, radius, radius)) < 1
    return paint(cv, label, blk.sl, inside, np.maximum(cv.vol[blk.sl], hu))
