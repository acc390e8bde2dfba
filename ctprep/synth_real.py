"""Real chest CT as the background of `ctprep synth --anatomy`: read, resample, segment, find landmarks.

A user points the generator at any chest CT (a DICOM series directory or a NIfTI/MHA/NRRD file).
It is read with `ctprep.io.read_volume`, reoriented to LPS, resampled once to a working grid of
about `WORK_MM` in-plane, and analysed with thresholds and connected components only (no trained
model), so it works on any scan with both lungs in view:

- lungs: air-like voxels (< -400 HU) that are not outside air (outside air touches the field of
  view and is below -960 HU; a cropped scan whose lungs touch the border keeps them), holes
  (vessels) filled per slice, split into right/left at the mediastinal midline;
- airways: voxels below -950 HU inside the lung fields that connect to the trachea;
- spine: the largest bone (> 180 HU) blob near the midline behind the lungs, per slice;
- trachea and carina: the round air blob between the lungs above the heart, tracked down until
  it divides;
- mediastinum: inside the convex hull of both lungs, not lung, in front of the spine;
- heart: the largest soft-tissue component of the mediastinum below the carina;
- descending aorta: per slice below the arch, the best-fitting ~11 mm disc of soft tissue (or
  of contrast blood) just left of and in front of the spine.

Coordinates: arrays are (z, y, x) with x towards the patient's left, y posterior, z superior
(LPS), `spacing` (dz, dy, dx) in mm. Landmarks are voxel indices on that grid. The analysis is
cached per file, so forked synth workers share it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WORK_MM = 1.25  # in-plane working resolution; z keeps the source spacing (at most 2.5 mm)


class AnatomyError(ValueError):
    """A background scan that cannot be used (unreadable, no lungs in view); names the file."""


@dataclass(eq=False)
class Background:
    """A real chest CT on the working grid, with the masks and landmarks findings are placed by."""

    source: str
    hu: np.ndarray              # float32 (z, y, x) HU, air-clamped
    spacing: tuple[float, float, float]   # (dz, dy, dx) mm
    origin: tuple[float, float, float]    # (z, y, x) mm of voxel 0 (LPS)
    body: np.ndarray            # bool: inside the patient (or the whole field when cropped)
    lung: np.ndarray            # uint8: 0 none, 1 right lung, 2 left lung (vessels included)
    airway: np.ndarray          # bool: airway lumen inside and above the lungs
    mediastinum: np.ndarray     # bool
    heart: np.ndarray           # bool
    spine: np.ndarray           # (z, 2) float voxel (y, x) of the vertebral body centre, nan if none
    aorta: np.ndarray           # (z, 3) float (y, x, radius_vox) of the descending aorta, nan if none
    mid_x: np.ndarray           # (z,) float x of the midline (spine centre) per slice
    lung_depth: np.ndarray      # float32 in-plane distance (mm) from a lung voxel to the lung edge
    carina: tuple[int, int, int]  # voxel (z, y, x)
    lung_z: tuple[int, int]     # lowest and highest slice with lung
    contrast: bool              # blood brighter than 150 HU (contrast-enhanced)
    cropped: bool               # the scan does not show the whole body outline
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    def mm(self, idx: np.ndarray | tuple) -> np.ndarray:
        """Voxel (z, y, x) indices -> LPS mm (z, y, x)."""
        return np.asarray(self.origin) + np.asarray(idx, dtype=np.float64) * np.asarray(self.spacing)

    @property
    def lungs(self) -> np.ndarray:
        return self.lung > 0


@functools.lru_cache(maxsize=4)
def load_background(path: str) -> Background:
    """Read and analyse `path` once per process (forked workers inherit the cache)."""
    image = _read_lps(Path(path))
    hu, spacing, origin = _working_grid(image)
    return analyse(hu, spacing, origin, source=str(path))


def _read_lps(path: Path):
    import SimpleITK as sitk

    from ctprep.io import VolumeReadError, read_volume

    try:
        image = read_volume(path)
    except VolumeReadError as exc:
        raise AnatomyError(f"--anatomy {exc}") from None
    return sitk.DICOMOrient(image, "LPS")


def _working_grid(image) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """Resample to ~WORK_MM in-plane (anti-aliased) and at most 2.5 mm in z; HU float32."""
    import SimpleITK as sitk

    sx, sy, sz = image.GetSpacing()
    out_sp = (max(sx, WORK_MM), max(sy, WORK_MM), min(max(sz, 1.0), 2.5))
    size = [max(1, int(round(n * s / o))) for n, s, o in zip(image.GetSize(), (sx, sy, sz), out_sp, strict=True)]
    image = sitk.Cast(image, sitk.sitkFloat32)
    sigma = [0.4 * max(o - s, 0.0) for s, o in zip((sx, sy, sz), out_sp, strict=True)]
    if max(sigma) > 0:
        image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigma])
    origin = image.TransformContinuousIndexToPhysicalPoint([(o / s - 1) / 2 for s, o in
                                                            zip((sx, sy, sz), out_sp, strict=True)])
    res = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, out_sp, image.GetDirection(),
                        -1024.0, sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(res)
    np.maximum(hu, -1024.0, out=hu)
    return hu, (out_sp[2], out_sp[1], out_sp[0]), (origin[2], origin[1], origin[0])


# ------------------------------------------------------------------------------------------ analysis


def _components(mask: np.ndarray, connectivity: int = 1):
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, n = ndimage.label(mask, structure=structure)
    return labels, n


def analyse(hu: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float],
            source: str = "<array>") -> Background:
    """Segment a working-grid HU volume (see the module docstring for each step)."""
    from scipy import ndimage

    notes: list[str] = []
    vox_mm2 = spacing[1] * spacing[2]
    outside, cropped = _outside_air(hu)
    body = ~outside
    lungs = _lung_fields(hu, body, spacing)
    if lungs.sum() * vox_mm2 * spacing[0] < 3e5:  # < 0.3 l of lung: not a chest scan
        raise AnatomyError(f"--anatomy {source}: found no lungs (less than 0.3 litres of lung-like voxels)")
    zs = np.flatnonzero(lungs.any(axis=(1, 2)))
    lung_z = (int(zs[0]), int(zs[-1]))
    spine = _spine(hu, lungs, spacing)
    mid_x = _midline(lungs, spine)
    xx = np.arange(hu.shape[2])[None, None, :]
    lung = np.where(lungs, np.where(xx < mid_x[:, None, None], 1, 2), 0).astype(np.uint8)
    trachea_top, carina = _carina(hu, body, lungs, spine, mid_x, spacing, lung_z)
    airway = _airways(hu, lungs, body, carina)
    from ctprep.synth_real_mediastinum import _aorta, _heart, _mediastinum

    mediastinum = _mediastinum(hu, lungs, body, spine, mid_x, spacing)
    contrast = bool(np.percentile(hu[mediastinum & (hu > 0) & (hu < 700)], 75) > 150) if mediastinum.any() else False
    heart = _heart(hu, lungs, body, mediastinum, spine, mid_x, carina, spacing, contrast)
    aorta = _aorta(hu, mediastinum, lungs, spine, carina, spacing, contrast, lung_z)
    if not heart.any():
        notes.append("no heart found: cardiac findings are skipped")
    lung = lung * (ndimage.binary_opening(lungs, iterations=1) & ~ndimage.binary_dilation(airway, iterations=2))
    depth = _lung_depth(lung > 0, spacing)
    return Background(source, hu, spacing, origin, body, lung.astype(np.uint8), airway, mediastinum, heart,
                      spine, aorta, mid_x, depth, carina, lung_z, contrast, cropped, notes)


def _lung_depth(lungs: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """In-plane distance (mm) of each lung voxel to the nearest non-lung voxel of its slice (cheap
    per-slice transforms; "peripheral" and "subpleural" findings are defined in-plane anyway)."""
    import cv2

    out = np.zeros(lungs.shape, dtype=np.float32)
    for z in range(lungs.shape[0]):
        if lungs[z].any():
            out[z] = cv2.distanceTransform(lungs[z].astype(np.uint8), cv2.DIST_L2, 5) * spacing[2]
    return out


def _outside_air(hu: np.ndarray) -> tuple[np.ndarray, bool]:
    """Air outside the patient: components of < -400 HU touching the in-plane border whose median is
    below -950 HU on average (true air; lung parenchyma is denser). `cropped`: no such air around the body."""
    labels, n = _components(hu < -400)
    border = np.zeros(hu.shape, dtype=bool)
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    touching = np.unique(labels[border & (labels > 0)])
    outside = np.zeros(hu.shape, dtype=bool)
    if touching.size:
        from scipy import ndimage

        mean = ndimage.mean(hu, labels, touching)
        air = touching[np.asarray(mean) < -950]
        outside = np.isin(labels, air)
    cropped = outside[:, 1:-1, 1:-1].mean() < 0.05
    return outside, cropped


def _lung_fields(hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The two largest air components inside the body (lungs may join through the airways),
    kept if they hold lung-density voxels, with vessels filled in per slice."""
    from scipy import ndimage

    air = (hu < -400) & body
    labels, n = _components(air)
    if n == 0:
        return air
    sizes = ndimage.sum_labels(np.ones_like(hu, dtype=np.float32), labels, np.arange(1, n + 1))
    mean = np.asarray(ndimage.mean(hu, labels, np.arange(1, n + 1)))
    order = np.argsort(sizes)[::-1][:2]
    keep = [int(i) + 1 for i in order if sizes[i] > 0.15 * sizes[order[0]] and -950 < mean[i] < -600]
    lungs = np.isin(labels, keep)
    for z in range(lungs.shape[0]):
        if lungs[z].any():
            lungs[z] = ndimage.binary_fill_holes(lungs[z])
    # A slice-wise fill also closes the trachea where it is surrounded by lung: fine for painting,
    # the airway mask is separate.
    return lungs


def _spine(hu: np.ndarray, lungs: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """(z, 2) voxel centre of the spine. First, in the slices where the lungs are widest, the largest
    bone blob in the middle third of the width behind the lungs' middle; the median of those is the
    spine's axis. Then, per slice, the largest bone blob within 25 mm of that axis (the spine is
    nearly straight; shoulder blades and clavicles are far from it). A bone blob is > 180 HU with
    some cortex (> 650 HU) in it, so a contrast-filled aorta (150-550 HU) is never taken for bone."""
    from scipy import ndimage

    out = np.full((hu.shape[0], 2), np.nan)
    w = hu.shape[2]
    area = lungs.sum(axis=(1, 2))
    wide = np.flatnonzero(area >= 0.5 * area.max())

    def blob(z: int, keep: np.ndarray) -> tuple[float, float] | None:
        bone = (hu[z] > 180) & keep
        labels, n = ndimage.label(bone)
        if n == 0:
            return None
        idx = np.arange(1, n + 1)
        sizes = ndimage.sum_labels(bone, labels, idx)
        sizes = np.where(np.asarray(ndimage.maximum(hu[z], labels, idx)) > 650, sizes, 0)
        best = int(np.argmax(sizes)) + 1
        if sizes[best - 1] * spacing[1] * spacing[2] < 150:
            return None
        return ndimage.center_of_mass(labels == best)

    first = []
    for z in wide:
        keep = np.zeros(hu.shape[1:], dtype=bool)
        ys = np.flatnonzero(lungs[z].any(axis=1))
        keep[(ys[0] + ys[-1]) // 2:, w // 3: 2 * w // 3] = True
        if (c := blob(int(z), keep)) is not None:
            first.append(c)
    if not first:
        return out
    ay, ax = np.median(np.array(first), axis=0)
    yy, xx = np.mgrid[: hu.shape[1], : hu.shape[2]]
    near = np.hypot((yy - ay) * spacing[1], (xx - ax) * spacing[2]) < 25
    for z in range(hu.shape[0]):
        if (c := blob(z, near)) is not None:
            out[z] = c
    return _fill_rows(out)


def _fill_rows(a: np.ndarray) -> np.ndarray:
    """Interpolate nan rows of a (z, k) track from their neighbours (ends held)."""
    good = np.isfinite(a).all(axis=1)
    if not good.any():
        return a
    zs = np.arange(len(a))
    return np.stack([np.interp(zs, zs[good], a[good, j]) for j in range(a.shape[1])], axis=1)


def _midline(lungs: np.ndarray, spine: np.ndarray) -> np.ndarray:
    """Per-slice x dividing right from left lung: the spine centre, else the lungs' middle."""
    mid = spine[:, 1].copy()
    if not np.isfinite(mid).all():
        xs = np.flatnonzero(lungs.any(axis=(0, 1)))
        mid[~np.isfinite(mid)] = (xs[0] + xs[-1]) / 2 if xs.size else lungs.shape[2] / 2
    return mid


def _carina(hu, body, lungs, spine, mid_x, spacing, lung_z) -> tuple[int, tuple[int, int, int]]:
    """Track the trachea (a round air blob of 1-7 cm² near the midline, in front of the spine) from
    the top of the lungs downwards; the carina is where it divides or ends. Returns the highest
    slice with trachea and the carina voxel."""
    from scipy import ndimage

    vox = spacing[1] * spacing[2]
    top = min(hu.shape[0] - 1, lung_z[1])
    prev = None
    last = None
    for z in range(top, lung_z[0], -1):
        air = (hu[z] < -900) & body[z]
        labels, n = ndimage.label(air)
        if n == 0:
            break
        idx = np.arange(1, n + 1)
        area = ndimage.sum_labels(air, labels, idx) * vox
        cy, cx = (np.asarray(c) for c in zip(*ndimage.center_of_mass(air, labels, idx), strict=True))
        ok = (area > 60) & (area < 700) & (np.abs(cx - mid_x[z]) < 35 / spacing[2])
        if np.isfinite(spine[z, 0]):
            ok &= cy < spine[z, 0] - 10 / spacing[1]
        if prev is not None:
            ok &= np.hypot(cy - prev[0], cx - prev[1]) < 12 / spacing[2]
        if not ok.any():
            break
        j = int(np.flatnonzero(ok)[np.argmin(np.abs(cx[ok] - (mid_x[z] if prev is None else prev[1])))])
        prev = (cy[j], cx[j])
        last = (z, int(round(cy[j])), int(round(cx[j])))
        if ok.sum() >= 2 and prev is not None and area[j] < 250:
            break  # two bronchi side by side: below the carina
    if last is None:  # no trachea in view (a crop below it): a third of the lung height down
        z = int(lung_z[1] - 0.3 * (lung_z[1] - lung_z[0]))
        ys = np.flatnonzero(lungs[z].any(axis=1))
        y = int(spine[z, 0] - 30 / spacing[1]) if np.isfinite(spine[z, 0]) else int(ys.mean())
        return hu.shape[0] - 1, (z, y, int(mid_x[z]))
    return top, last


def _airways(hu, lungs, body, carina) -> np.ndarray:
    """Airway lumen: the component of < -900 HU voxels holding the carina (trachea, bronchi), grown
    at -950 HU instead when -900 leaks into the parenchyma (more than 3 % of the lung volume)."""
    from scipy import ndimage

    z, y, x = carina
    for level in (-900, -950):
        cand = (hu < level) & body
        labels, _ = ndimage.label(cand)
        near = labels[max(z - 2, 0): z + 3, max(y - 4, 0): y + 5, max(x - 4, 0): x + 5]
        ids = np.unique(near[near > 0])
        if ids.size == 0:
            continue
        airway = np.isin(labels, ids)
        if airway.sum() < 0.03 * lungs.sum():
            return airway
    return np.zeros(hu.shape, dtype=bool)
