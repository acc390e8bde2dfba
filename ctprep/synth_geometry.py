"""Sampling and shape primitives for `ctprep synth`: grids, smooth random fields, closed-form shapes.

Shapes live in patient millimetres (LPS like the written NIfTI: +x patient left, +y posterior,
+z superior) and are evaluated by numpy broadcasting on the whole grid or on the bounding block of
a small object, never with per-voxel Python loops. Because nothing depends on the voxel grid, two
reconstructions of one scan (other slice spacing, kernel, noise) show the same anatomy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

Point = tuple[float, float, float]


# ------------------------------------------------------------------------------------------ sampling

@dataclass(frozen=True)
class View:
    """A block of the volume: index slices, patient-frame coordinates (broadcastable to the block)
    and the unrotated 1-D coordinates that smooth fields are sampled on."""

    sl: tuple[slice, slice, slice]
    z: np.ndarray  # (nz, 1, 1)
    y: np.ndarray  # (1, ny, nx)
    x: np.ndarray  # (1, ny, nx)
    fz: np.ndarray
    fy: np.ndarray
    fx: np.ndarray


class Grid:
    """Voxel centres of one reconstruction; the patient lies rotated by `angle` about z."""

    def __init__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, angle: float) -> None:
        self.z, self.y, self.x = z, y, x  # ascending; y, x relative to the body centre
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.shape = (len(z), len(y), len(x))
        self.dz = float(z[1] - z[0]) if len(z) > 1 else 1.0

    def view(self, zs: slice = slice(None), ys: slice = slice(None), xs: slice = slice(None)) -> View:
        z, y, x = self.z[zs], self.y[ys], self.x[xs]
        px = (self.cos * x[None, :] - self.sin * y[:, None]).astype(np.float32)
        py = (self.sin * x[None, :] + self.cos * y[:, None]).astype(np.float32)
        return View((zs, ys, xs), z[:, None, None].astype(np.float32), py[None], px[None], z, y, x)

    def block(self, center: Point, half: Point) -> View | None:
        """View of the axis-aligned patient-frame box `center ± half`, or None outside the grid."""
        (cx, cy, cz), (hx, hy, hz) = center, half
        c, s = self.cos, self.sin
        sx, sy = c * cx + s * cy, -s * cx + c * cy
        ex, ey = abs(c) * hx + abs(s) * hy, abs(s) * hx + abs(c) * hy
        sls = [_index_range(a, m, h) for a, m, h in ((self.z, cz, hz), (self.y, sy, ey), (self.x, sx, ex))]
        if any(sl.stop <= sl.start for sl in sls):
            return None
        return self.view(*sls)


def _index_range(coords: np.ndarray, center: float, half: float) -> slice:
    lo = int(np.searchsorted(coords, center - half))
    return slice(lo, int(np.searchsorted(coords, center + half, side="right")))


def _bspline(t: np.ndarray) -> np.ndarray:
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a * a + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


_FIELD_LO = (-470.0, -350.0, -350.0)  # lattice extent (z, y, x) mm: covers every scan range
_FIELD_HI = (370.0, 350.0, 350.0)


@functools.lru_cache(maxsize=16)  # the fields of one scan, reused by its reconstructions
def _lattice(seed: int, cell: float) -> np.ndarray:
    shape = [int((hi - lo) // cell) + 1 for lo, hi in zip(_FIELD_LO, _FIELD_HI, strict=True)]
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def smooth_field(seed: int, cell: float, v: View) -> np.ndarray:
    """Zero-mean, unit-variance random field with correlation length ~`cell` mm on a view.

    White noise on a lattice anchored in millimetres, interpolated with cubic B-splines as three
    separable matrix products, so any grid samples the same field."""
    lattice = _lattice(seed, cell)
    weights, cuts = [], []
    for coords, lo, n in zip((v.fz, v.fy, v.fx), _FIELD_LO, lattice.shape, strict=True):
        k0 = int(np.clip(math.floor((coords[0] - lo) / cell) - 1, 0, n))
        k1 = int(np.clip(math.floor((coords[-1] - lo) / cell) + 3, k0, n))
        w = _bspline((coords[:, None] - (lo + cell * np.arange(k0, k1))[None, :]) / cell)
        w /= np.sqrt((w * w).sum(axis=1, keepdims=True)) + 1e-9
        weights.append(w.astype(np.float32))
        cuts.append(slice(k0, k1))
    f = lattice[tuple(cuts)] @ weights[2].T
    f = weights[1] @ f
    return np.tensordot(weights[0], f, axes=1)


def smoothstep(t: np.ndarray | float) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ------------------------------------------------------------------------------------ shape kernels

def ellipsoid_xyz(x: np.ndarray, y: np.ndarray, z: np.ndarray, c: Point, r: Point,
                  angle: float = 0.0) -> np.ndarray:
    """Squared normalised radius of an ellipsoid (< 1 inside), rotated by `angle` about z."""
    dx, dy = x - c[0], y - c[1]
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    return (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def ellipsoid_q(v: View, c: Point, r: Point, angle: float = 0.0) -> np.ndarray:
    return ellipsoid_xyz(v.x, v.y, v.z, c, r, angle)


def segment_dist2(v: View, p0: Point, p1: Point) -> np.ndarray:
    """Squared distance to the segment p0-p1 (capsules and tubes)."""
    d = np.subtract(p1, p0, dtype=np.float64)
    ax, ay, az = v.x - p0[0], v.y - p0[1], v.z - p0[2]
    t = np.clip((ax * d[0] + ay * d[1] + az * d[2]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    return (ax - t * d[0]) ** 2 + (ay - t * d[1]) ** 2 + (az - t * d[2]) ** 2


def tube_view(grid: Grid, p0: Point, p1: Point, r: float) -> View | None:
    mid = tuple((a + b) / 2 for a, b in zip(p0, p1, strict=True))
    half = tuple(abs(a - b) / 2 + r + 1 for a, b in zip(p0, p1, strict=True))
    return grid.block(mid, half)


def paint(vol: np.ndarray, v: View, mask: np.ndarray, value: float | np.ndarray) -> None:
    np.copyto(vol[v.sl], np.asarray(value, dtype=vol.dtype), where=mask)


def paint_tube(vol: np.ndarray, grid: Grid, p0: Point, p1: Point, layers: list[tuple[float, float]],
               where: np.ndarray | None = None) -> None:
    """Paint concentric tubes, `layers` = [(radius, hu), ...] from outside in; `where` is a full-size
    mask restricting the paint (e.g. to lung)."""
    v = tube_view(grid, p0, p1, layers[0][0])
    if v is None:
        return
    d2 = segment_dist2(v, p0, p1)
    for radius, hu in layers:
        mask = d2 < radius * radius
        paint(vol, v, mask if where is None else mask & where[v.sl], hu)


@functools.lru_cache(maxsize=64)
def _stencil(radius: float, dz: float, dxy: float) -> np.ndarray:
    """Voxel offsets (k, 3) of a ball of `radius` mm on a grid with spacings (dz, dxy, dxy)."""
    nz, nxy = int(radius / dz + 0.5), int(radius / dxy + 0.5)
    oz, oy, ox = np.meshgrid(*(np.arange(-n, n + 1) for n in (nz, nxy, nxy)), indexing="ij")
    inside = (oz * dz) ** 2 + (oy * dxy) ** 2 + (ox * dxy) ** 2 <= max(radius, 0.5 * min(dz, dxy)) ** 2
    return np.stack([oz[inside], oy[inside], ox[inside]], axis=1)


def splat_tubes(grid: Grid, segments: np.ndarray) -> np.ndarray:
    """Full-size mask of many thin tubes at once; `segments` rows are (x0, y0, z0, x1, y1, z1, r).

    Points every half voxel along each centreline are stamped with a ball stencil of their radius
    (rounded to 0.25 mm), which is much cheaper than a distance field per tube when there are
    thousands of them (the pulmonary vessel tree)."""
    mask = np.zeros(grid.shape, dtype=bool)
    if len(segments) == 0:
        return mask
    dz, dxy = grid.dz, float(grid.x[1] - grid.x[0])
    p0, p1, r = segments[:, :3], segments[:, 3:6], np.round(segments[:, 6] * 4) / 4
    steps = np.maximum(np.ceil(np.linalg.norm(p1 - p0, axis=1) / (0.5 * min(dz, dxy))).astype(int), 1) + 1
    seg = np.repeat(np.arange(len(segments)), steps)
    first = np.repeat(np.cumsum(steps) - steps, steps)
    t = (np.arange(len(seg)) - first) / np.repeat(steps - 1, steps).clip(1)
    pts = p0[seg] + t[:, None] * (p1 - p0)[seg]
    xs, ys = grid.cos * pts[:, 0] + grid.sin * pts[:, 1], -grid.sin * pts[:, 0] + grid.cos * pts[:, 1]
    idx = np.stack([(pts[:, 2] - grid.z[0]) / dz, (ys - grid.y[0]) / dxy, (xs - grid.x[0]) / dxy], axis=1)
    idx = np.rint(idx).astype(np.int64)
    shape = np.array(grid.shape)
    for radius in np.unique(r[seg]):
        stamps = (idx[r[seg] == radius][:, None, :] + _stencil(float(radius), dz, dxy)[None]).reshape(-1, 3)
        stamps = stamps[((stamps >= 0) & (stamps < shape)).all(axis=1)]
        mask[stamps[:, 0], stamps[:, 1], stamps[:, 2]] = True
    return mask
