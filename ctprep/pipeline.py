"""One volume, end to end: file -> HU -> orientation -> resampled body crop -> windows -> CLAHE.

Stage order is chosen for speed (the whole build must cost at most 1.5x a bare SimpleITK
decode): the stored pixels are never copied at full size; the HU rescale is affine, so it is
decided on the full volume but applied after resampling, to the small array; the padding clamp
(stored units) happens per slice while reading. See `ctprep.geometry` for the resampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctprep import geometry, quality, windows
from ctprep.config import validate_preprocess
from ctprep.hu import HURescale, VolumeMeta, decide_rescale
from ctprep.io import read_notes, read_volume

if TYPE_CHECKING:
    import SimpleITK as sitk

    from ctprep.config import PreprocessConfig

_SPACING_TOLERANCE = 0.02      # relative header/CSV spacing difference reported as a mismatch


@dataclass
class PreprocessResult:
    images: np.ndarray                              # uint8 (D, C, H, W), channels in cfg.windows order
    info: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable provenance and QC

    @property
    def flags(self) -> list[str]:
        return list(self.info.get("qc_flags", []))


class _Clock:
    """Wall time per stage, in seconds (rounded for JSON)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(self.timings.get(stage, 0.0) + now - self._last, 4)
        self._last = now


def preprocess_volume(path: Path, cfg: PreprocessConfig, meta: VolumeMeta | None = None) -> PreprocessResult:
    """Read `path` (see `ctprep.io.read_volume`) and preprocess it; read errors raise VolumeReadError."""
    start = time.perf_counter()
    image = read_volume(Path(path))
    read_s = time.perf_counter() - start
    result = preprocess_image(image, cfg, meta)
    result.info["source"]["path"] = str(path)
    result.info["timings"] = {"read": round(read_s, 4), **result.info["timings"]}
    return result


def preprocess_image(image: sitk.Image, cfg: PreprocessConfig, meta: VolumeMeta | None = None) -> PreprocessResult:
    """Preprocess a 3D SimpleITK image to uint8 (D, C, H, W) with `cfg` (the image is not modified).

    Raises ConfigError for invalid `cfg` values and ValueError for an image that is not a scalar
    3D volume (`read_volume` never returns one)."""
    import SimpleITK as sitk

    validate_preprocess(cfg)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a scalar 3D image, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    clock = _Clock()
    stored = sitk.GetArrayViewFromImage(image)      # zero-copy; `image` outlives it in this scope
    stored_min = _stored_min(stored)                # the one full pass over the stored voxels
    rescale = decide_rescale(stored_min, meta, cfg.hu_rule)
    spacing, spacing_source, flags = _spacing(image, meta)
    frame = geometry.frame_of(image, cfg.orientation, spacing)
    view = frame.view(stored)
    clock.lap("stats")

    body = geometry.find_body(view, frame, rescale, cfg.body_threshold_hu, cfg.air_hu)
    stats = quality.hu_stats(body.sample_hu)
    lo, hi = (body.lo, body.hi) if cfg.crop_body else ((0, 0, 0), frame.shape)
    plans = [geometry.plan_axis(frame.shape[b], frame.origin[b], frame.spacing[b], lo[b], hi[b],
                                float(cfg.spacing[b]), int(cfg.shape[b])) for b in range(3)]
    clock.lap("body")

    air_stored = rescale.to_stored(cfg.air_hu)
    clamp = air_stored if stored_min < air_stored or stored.dtype.kind == "f" else None
    hu = geometry.resample_to_output(view, plans, clamp_below=clamp, scale=rescale.slope,
                                     shift=rescale.intercept, fill=cfg.air_hu)
    clock.lap("resample")

    images = windows.windows_to_channels(hu, cfg.windows)
    clock.lap("windows")
    windows.apply_clahe(images, cfg.clahe_clip_limit, cfg.clahe_tiles)
    clock.lap("clahe")
    if cfg.mask_outside_body:  # after CLAHE: the pixels inside the body are exactly the unmasked ones
        windows.mask_outside_body(images, windows.body_mask(hu, cfg.body_threshold_hu))
        clock.lap("mask")

    if not body.found:
        flags.append("body-not-found")
    flags += quality.check_volume(stats, images, [w.name for w in cfg.windows])
    clock.lap("qc")
    info = {
        "hu_rule": rescale.rule,
        "hu_rescale": {"slope": rescale.slope, "intercept": rescale.intercept},
        "source": _source_info(image, stored, stored_min, spacing, spacing_source, rescale),
        "orientation": {"code": cfg.orientation, "perm": list(frame.perm), "flip": list(frame.flip)},
        "body": _body_info(body, frame, plans),
        "output": {"shape": [int(s) for s in images.shape],
                   "spacing_zyx": [round(p.step, 5) for p in plans],
                   "origin_zyx": [round(p.out_origin, 3) for p in plans],
                   "antialias": [{"factor": p.factor, "sigma": round(p.sigma, 3)} for p in plans]},
        "hu_stats": stats,
        "qc_flags": flags,
        "notes": read_notes(image),
        "timings": clock.timings,
    }
    return PreprocessResult(images=images, info=info)


def _stored_min(stored: np.ndarray) -> float:
    if stored.size == 0:
        return 0.0
    return float(np.nanmin(stored)) if stored.dtype.kind == "f" else float(stored.min())


def _spacing(image: sitk.Image, meta: VolumeMeta | None) -> tuple[tuple[float, ...], str, list[str]]:
    """Voxel spacing (x, y, z): the metadata CSV's when given (CT-RATE v1 headers are not
    trustworthy; the CSV comes from the DICOM), else the header's. A disagreement is flagged."""
    header = tuple(float(s) for s in image.GetSpacing())
    if meta is None or meta.xy_spacing is None or meta.z_spacing is None:
        return header, "header", []
    row, col = (float(v) for v in meta.xy_spacing)        # DICOM PixelSpacing order: rows (y), cols (x)
    csv = (col, row, float(meta.z_spacing))
    if min(csv) <= 0:
        return header, "header", ["metadata-spacing-invalid"]
    differs = any(abs(a - b) > _SPACING_TOLERANCE * b for a, b in zip(header, csv, strict=True))
    return csv, "metadata", (["spacing-header-differs-from-metadata"] if differs else [])


def _source_info(image: sitk.Image, stored: np.ndarray, vmin: float, spacing: tuple[float, ...],
                 spacing_source: str, rescale: HURescale) -> dict[str, Any]:
    return {
        "size_xyz": list(image.GetSize()),
        "spacing_xyz": [round(s, 5) for s in spacing],
        "spacing_source": spacing_source,
        "header_spacing_xyz": [round(s, 5) for s in image.GetSpacing()],
        "origin_xyz": [round(o, 3) for o in image.GetOrigin()],
        "direction": [round(d, 5) for d in image.GetDirection()],
        "dtype": str(stored.dtype),
        "stored_min": vmin,
        "hu_min": round(vmin * rescale.slope + rescale.intercept, 2),
    }


def _body_info(body: geometry.Body, frame: geometry.Frame, plans: list[geometry.AxisPlan]) -> dict[str, Any]:
    extent = [(h - lo) * s for lo, h, s in zip(body.lo, body.hi, frame.spacing, strict=True)]
    fov = [p.out_size * p.step for p in plans]
    return {
        "found": body.found,
        "bbox_lo_zyx": list(body.lo),
        "bbox_hi_zyx": list(body.hi),
        "extent_mm_zyx": [round(e, 1) for e in extent],
        "cropped_by_fov_zyx": [bool(e > f + s) for e, f, s in zip(extent, fov, frame.spacing, strict=True)],
        "roi_zyx": [[p.start, p.stop] for p in plans],
    }
