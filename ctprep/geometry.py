"""Orientation, body crop and resampling of one volume to a fixed (D, H, W) grid.

Speed drives the design (a volume must cost far less than its gzip decode), so no full-size
copy of the volume is ever made:

1. Orientation is a numpy view (transpose + negative strides) of SimpleITK's pixel buffer that
   equals `sitk.DICOMOrient(image, code)` without its copy (`oriented_frame`). Everything after
   works on that view, so a scan stored with flipped axes gives the same voxels in the same
   order and caches the same image.
2. The body is found on a strided ~5 mm subsample (`find_body`): threshold, an in-plane opening
   that detaches thin structures such as the CT table, and the large 3D connected components.
3. Only the region of interest (body box within the output field of view) is read, one slice
   at a time (`resample_to_output`): float32 conversion, padding clamp and an integer block
   mean (OpenCV's exact, fast INTER_AREA path), then a residual Gaussian on the reduced planes.
   Block mean and Gaussian together are the anti-alias filter: their combined variance matches
   a Gaussian of sigma (r - 1) / 2 input voxels for a downsampling ratio r (the rule of
   skimage.transform.resize), so a small structure fades instead of vanishing or aliasing.
4. The reduced planes are linearly resampled (z by weighted plane sums, y/x by cv2
   INTER_LINEAR) edge to edge onto the output spacing and written into the fixed (D, H, W)
   output, body centre at voxel n // 2, air elsewhere. Fitting a whole number of output voxels
   into the region keeps the spacing within half a voxel over the region (0.5 % when it spans
   100 output voxels): the price of OpenCV's fast resize instead of a general resampler.

Coordinates: `u` is millimetres along the oriented numpy axes (z, y, x) of the target
orientation, i.e. physical position projected onto those axes with the code's signs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

    from ctprep.hu import HURescale

# letter -> (physical LPS axis, sign): an index axis labelled L runs towards +x, R towards -x, ...
_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


class OrientationError(ValueError):
    """An orientation code that is not three letters, one from each of LR, PA and SI."""


# ------------------------------------------------------------------------------------ orientation


@dataclass(frozen=True)
class Frame:
    """How a stored (sitk numpy-order) array maps onto the target orientation, numpy order z, y, x."""

    perm: tuple[int, ...]                   # oriented axis b reads stored numpy axis perm[b]
    flip: tuple[bool, ...]                  # oriented axis b runs against the stored axis
    origin: tuple[float, ...]               # u (mm) of oriented voxel (0, 0, 0)
    spacing: tuple[float, ...]              # mm per voxel along the oriented axes
    shape: tuple[int, ...]                  # oriented array shape

    def view(self, stored: np.ndarray) -> np.ndarray:
        """The oriented array as a view of `stored` (no copy)."""
        oriented = np.transpose(stored, self.perm)
        return oriented[tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)]


def parse_orientation(code: str) -> list[tuple[int, int]]:
    """'LPS' -> [(physical axis, sign)] for sitk index axes i, j, k."""
    code = code.upper()
    axes = [_LETTERS.get(ch) for ch in code]
    if len(code) != 3 or None in axes or sorted(a[0] for a in axes) != [0, 1, 2]:  # type: ignore[index]
        raise OrientationError(f"orientation must be 3 letters, one of each L/R, P/A, S/I; got '{code}'")
    return axes  # type: ignore[return-value]


def oriented_frame(size: tuple[int, ...], spacing: tuple[float, ...], origin: tuple[float, ...],
                   direction: tuple[float, ...], code: str = "LPS") -> Frame:
    """The view that reorients a volume like `sitk.DICOMOrient(image, code)`.

    Each stored index axis is assigned the physical axis it is closest to (the permutation that
    maximises the summed |cosines|, so oblique scans snap to the nearest orientation)."""
    target = parse_orientation(code)
    cosines = np.asarray(direction, dtype=float).reshape(3, 3)   # column c: direction of index axis c
    best = max(itertools.permutations(range(3)),
               key=lambda p: sum(abs(cosines[p[c], c]) for c in range(3)))
    stored_axis_of = {best[c]: c for c in range(3)}             # physical axis -> stored index axis
    first = np.zeros(3)                                          # stored index of oriented voxel 0
    src_axis, flip = [0, 0, 0], [False, False, False]
    for t, (phys, sign) in enumerate(target):
        c = stored_axis_of[phys]
        src_axis[t] = c
        flip[t] = bool(np.sign(cosines[phys, c]) != sign)
        first[c] = size[c] - 1 if flip[t] else 0
    point = np.asarray(origin, dtype=float) + cosines @ (first * np.asarray(spacing, dtype=float))
    u0 = [target[t][1] * point[target[t][0]] for t in range(3)]
    order = (2, 1, 0)                                            # numpy axis b <-> sitk axis 2 - b
    return Frame(
        perm=tuple(2 - src_axis[t] for t in order),
        flip=tuple(flip[t] for t in order),
        origin=tuple(float(u0[t]) for t in order),
        spacing=tuple(float(spacing[src_axis[t]]) for t in order),
        shape=tuple(int(size[src_axis[t]]) for t in order),
    )


def frame_of(image: sitk.Image, code: str = "LPS", spacing: tuple[float, ...] | None = None) -> Frame:
    """`oriented_frame` for a SimpleITK image; `spacing` (x, y, z) overrides the header's."""
    return oriented_frame(image.GetSize(), spacing or image.GetSpacing(), image.GetOrigin(),
                          image.GetDirection(), code)


# ------------------------------------------------------------------------------------------- body


@dataclass
class Body:
    lo: tuple[int, ...]          # oriented voxel box [lo, hi) holding the body
    hi: tuple[int, ...]
    found: bool
    sample_hu: np.ndarray        # the coarse HU subsample it was found on (for statistics)


def find_body(view: np.ndarray, frame: Frame, rescale: HURescale, threshold_hu: float,
              air_hu: float, coarse_mm: float = 5.0) -> Body:
    """Bounding box of the body: voxels above `threshold_hu` on a ~`coarse_mm` subsample, opened
    in-plane (cuts the table and thin cables), keeping components >= 10 % of the largest one."""
    import cv2
    import SimpleITK as sitk

    from ctprep.hu import apply_rescale

    steps = [max(1, round(coarse_mm / s)) for s in frame.spacing]
    sample = np.array(view[::steps[0], ::steps[1], ::steps[2]], dtype=np.float32)
    if view.dtype.kind == "f":
        np.nan_to_num(sample, copy=False, nan=rescale.to_stored(air_hu))
    sample = apply_rescale(sample, rescale)
    np.maximum(sample, np.float32(air_hu), out=sample)
    mask = (sample > threshold_hu).astype(np.uint8)
    if min(mask.shape[1:]) >= 3:
        kernel = np.ones((3, 3), np.uint8)
        for z in range(mask.shape[0]):
            mask[z] = cv2.morphologyEx(mask[z], cv2.MORPH_OPEN, kernel)
    full = (0, 0, 0), frame.shape
    if not mask.any():
        return Body(*full, found=False, sample_hu=sample)
    relabel = sitk.RelabelComponentImageFilter()  # labels sorted by size, 1 = largest
    labels = sitk.GetArrayFromImage(relabel.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(mask))))
    sizes = relabel.GetSizeOfObjectsInPixels()
    keep = 1 + sum(1 for s in sizes[1:] if s >= 0.1 * sizes[0])
    body = (labels > 0) & (labels <= keep)
    lo, hi = [], []
    for b in range(3):
        other = tuple(a for a in range(3) if a != b)
        idx = np.flatnonzero(body.any(axis=other))
        # one coarse step of margin: the subsample can miss up to a step of skin
        lo.append(max(0, (int(idx[0]) - 1) * steps[b]))
        hi.append(min(frame.shape[b], (int(idx[-1]) + 2) * steps[b] + 1))
    return Body(tuple(lo), tuple(hi), found=True, sample_hu=sample)


# --------------------------------------------------------------------------------------- sampling


def antialias(ratio: float, max_factor: int | None = None) -> tuple[int, float]:
    """(integer block-mean factor, residual Gaussian sigma in block voxels) for downsampling by
    `ratio` = output spacing / input spacing.

    The target is a Gaussian of variance ((ratio - 1) / 2)^2 input voxels^2 (skimage's
    anti-aliasing rule); a block mean of f voxels contributes (f^2 - 1) / 12 of it, the Gaussian
    the rest. f rounds up from ratio - 0.25 so that e.g. 0.75 -> 1.4 mm uses a 2-voxel mean
    instead of a Gaussian over the full-resolution volume."""
    if ratio <= 1.0:
        return 1, 0.0
    factor = max(1, int(math.floor(ratio + 0.25)))
    if max_factor is not None:
        factor = max(1, min(factor, max_factor))
    residual = ((ratio - 1.0) / 2.0) ** 2 - (factor ** 2 - 1) / 12.0
    sigma = math.sqrt(residual) / factor if residual > 0 else 0.0
    return factor, (sigma if sigma >= 0.2 else 0.0)  # below 0.2 voxel a kernel is ~ identity


@dataclass
class AxisPlan:
    """One oriented axis: which input voxels are read, how they are reduced, where they land.

    The region of interest [start, stop) is block-averaged by `factor`, smoothed by `sigma`
    (block voxels), then linearly resampled edge to edge onto `size` output voxels of spacing
    `step` (= input extent / size, within half a voxel of the configured spacing over the ROI),
    which land at output index `offset` (negative or past `out_size`: cropped)."""

    start: int
    stop: int                    # stop - start is a multiple of factor
    factor: int
    sigma: float
    size: int
    offset: int
    out_size: int
    step: float                  # mm between output voxels
    out_origin: float            # u (mm) of output voxel 0

    @property
    def reduced_size(self) -> int:
        return (self.stop - self.start) // self.factor


def plan_axis(n: int, u0: float, step: float, lo: int, hi: int, out_step: float, out_size: int) -> AxisPlan:
    """Plan one axis of `n` voxels (spacing `step`, voxel 0 at `u0`) whose body box is [lo, hi);
    the body centre lands on output voxel out_size // 2."""
    ratio = out_step / step
    factor, _ = antialias(ratio)
    centre = u0 + step * (lo + hi - 1) / 2.0
    half = out_size // 2
    first = (centre - half * out_step - u0) / step
    last = first + (out_size - 1) * ratio
    margin = factor + 1 + math.ceil(ratio)                         # rounding slack; cropped later
    start = max(0, lo, math.floor(first) - margin)
    stop = min(n, hi, math.ceil(last) + margin + 1)
    if stop <= start:                                            # grid misses the box: keep a voxel
        start = min(max(0, start), n - 1)
        stop = start + 1
    factor, sigma = antialias(ratio, max_factor=stop - start)
    extra = (-(stop - start)) % factor
    if stop + extra <= n:
        stop += extra
    else:
        stop -= (stop - start) % factor
    size = max(1, round((stop - start) / ratio))
    eff = (stop - start) * step / size
    edge = u0 + (start - 0.5) * step
    offset = half - round((centre - edge) / eff - 0.5)
    return AxisPlan(start, stop, factor, sigma, size, offset, out_size, eff, edge + (0.5 - offset) * eff)


def _gauss_kernel(sigma: float) -> np.ndarray:
    if sigma <= 0:
        return np.ones(1, np.float32)
    x = np.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def slice_weights(n: int, size: int, sigma: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each of `size` output slices: (block indices, weights) combining the residual Gaussian
    along z (reflected at the ends) with edge-aligned linear interpolation from `n` blocks."""
    kernel = _gauss_kernel(sigma).astype(np.float64)
    radius = len(kernel) // 2
    rows = []
    for m in range(size):
        s = min(max((m + 0.5) * n / size - 0.5, 0.0), n - 1.0)
        i0 = int(s)
        lerp = [(i0, 1.0 - (s - i0))] + ([(i0 + 1, s - i0)] if s > i0 else [])
        acc: dict[int, float] = {}
        for j, wj in lerp:
            for t, g in enumerate(kernel):
                k = j + t - radius
                if n > 1:  # reflect-101 at both ends, like OpenCV's default border
                    while k < 0 or k > n - 1:
                        k = -k if k < 0 else 2 * (n - 1) - k
                else:
                    k = 0
                acc[k] = acc.get(k, 0.0) + wj * float(g)
        idx = np.array(sorted(acc), dtype=np.int64)
        rows.append((idx, np.array([acc[i] for i in idx], dtype=np.float32)))
    return rows


class _BlockReader:
    """Block-mean planes of the region, read lazily from the view and kept only while needed."""

    def __init__(self, view: np.ndarray, plans: list[AxisPlan], clamp_below: float | None):
        pz, py, px = plans
        self.region = view[:, py.start:py.stop, px.start:px.stop]
        self.z0, self.fz = pz.start, pz.factor
        self.shape = (py.reduced_size, px.reduced_size)
        self.shrink = py.factor > 1 or px.factor > 1
        self.clamp = None if clamp_below is None else np.float32(clamp_below)
        self.nan_fill = 0.0 if clamp_below is None else float(clamp_below)
        self.is_float = view.dtype.kind == "f"
        self.cache: dict[int, np.ndarray] = {}

    def plane(self, z: int) -> np.ndarray:
        import cv2

        plane = np.array(self.region[z], dtype=np.float32, order="C")
        if self.is_float:
            np.nan_to_num(plane, copy=False, nan=self.nan_fill)
        if self.clamp is not None:
            np.maximum(plane, self.clamp, out=plane)
        if self.shrink:  # integer factors take OpenCV's fast exact block-mean path
            plane = cv2.resize(plane, self.shape[::-1], interpolation=cv2.INTER_AREA)
        return plane

    def block(self, j: int) -> np.ndarray:
        if j not in self.cache:
            first = self.z0 + j * self.fz
            acc = self.plane(first)
            for z in range(first + 1, first + self.fz):
                acc += self.plane(z)
            if self.fz > 1:
                acc *= np.float32(1.0 / self.fz)
            self.cache[j] = acc
        return self.cache[j]

    def forget_below(self, j: int) -> None:
        for k in [k for k in self.cache if k < j]:
            del self.cache[k]


def _resampled_slices(view: np.ndarray, plans: list[AxisPlan], clamp_below: float | None,
                      first: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
    """Output slices first..stop-1 of the region as (index, (size y, size x) float32 plane).

    Streams: each output slice combines a few block-mean planes (Gaussian and linear weights
    along z), is smoothed in-plane and resized, so no full-size intermediate exists."""
    import cv2

    pz, py, px = plans
    reader = _BlockReader(view, plans, clamp_below)
    rows = slice_weights(pz.reduced_size, pz.size, pz.sigma)
    kx, ky = _gauss_kernel(px.sigma), _gauss_kernel(py.sigma)
    smooth_xy = (len(kx) > 1 or len(ky) > 1) and min(reader.shape) > 1
    for m in range(first, stop):
        idx, weights = rows[m]
        if len(idx) == 1:
            plane = reader.block(int(idx[0]))
        else:
            plane = reader.block(int(idx[0])) * weights[0]
            for k, w in zip(idx[1:], weights[1:], strict=True):
                plane += reader.block(int(k)) * w
        if smooth_xy:
            plane = cv2.sepFilter2D(plane, -1, kx, ky, borderType=cv2.BORDER_REFLECT_101)
        yield m, cv2.resize(plane, (px.size, py.size), interpolation=cv2.INTER_LINEAR)
        if m + 1 < stop:
            reader.forget_below(int(rows[m + 1][0].min()))


def reduce_volume(view: np.ndarray, plans: list[AxisPlan], clamp_below: float | None = None) -> np.ndarray:
    """The whole planned region resampled to float32 (size z, size y, size x), in stored units.

    `clamp_below` (stored units) replaces padding below air before any averaging, so it never
    bleeds into tissue at the field-of-view edge."""
    out = np.empty([p.size for p in plans], np.float32)
    for m, plane in _resampled_slices(view, plans, clamp_below, 0, plans[0].size):
        out[m] = plane
    return out


def resample_to_output(view: np.ndarray, plans: list[AxisPlan], clamp_below: float | None = None,
                       scale: float = 1.0, shift: float = 0.0, fill: float = 0.0) -> np.ndarray:
    """The fixed (D, H, W) float32 output: the region resampled and mapped by value * scale +
    shift (the HU rescale, cheap here because the array is small), `fill` (air) elsewhere.

    Output slices outside (D, H, W) are never computed."""
    canvas = np.empty([p.out_size for p in plans], np.float32)
    dst, src = [], []
    for p in plans:
        lo, hi = max(0, p.offset), min(p.out_size, p.offset + p.size)
        if hi <= lo:
            canvas.fill(fill)
            return canvas
        dst.append(slice(lo, hi))
        src.append(slice(lo - p.offset, hi - p.offset))
    for axis in range(3):                                  # air around the region, slab by slab
        before = tuple(dst[:axis]) + (slice(0, dst[axis].start),)
        after = tuple(dst[:axis]) + (slice(dst[axis].stop, None),)
        canvas[before] = fill
        canvas[after] = fill
    region = canvas[tuple(dst)]
    for m, plane in _resampled_slices(view, plans, clamp_below, src[0].start, src[0].stop):
        target = region[m - src[0].start]
        np.multiply(plane[src[1], src[2]], np.float32(scale), out=target)
        if shift:
            target += np.float32(shift)
    return canvas
