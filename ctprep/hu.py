"""Hounsfield units: which rescale applies to a volume, applying it, and clamping padding.

CT-RATE ships two encodings of the same scans. Release v1 (`train/`) stores raw scanner values,
HU = value * RescaleSlope + RescaleIntercept with both taken from the metadata CSV. Release v2
(`train_fixed/`) is already in HU, but its CSV still carries the DICOM intercept (often -1024),
so applying the CSV blindly shifts every v2 voxel by -1024 (the failure of the pipeline this
project replaces). The rule is therefore decided per volume and recorded: the CSV is applied
only to a raw-looking volume (minimum >= 0, because HU volumes always contain air < 0) whose CSV
intercept is negative.

Rescaling is affine, so it commutes with linear interpolation and averaging: the pipeline
decides the rule on the full volume but applies it to the small resampled array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("auto", "raw", "hu")


class HURuleError(ValueError):
    """A HU rule that cannot be applied (unknown name, or `raw` without CSV slope/intercept)."""


@dataclass
class VolumeMeta:
    """One row of the CT-RATE metadata CSV (all fields optional)."""

    slope: float | None = None
    intercept: float | None = None
    xy_spacing: tuple[float, float] | None = None
    z_spacing: float | None = None


@dataclass(frozen=True)
class HURescale:
    """HU = stored * slope + intercept; `rule` names why (recorded per volume in the store)."""

    rule: str
    slope: float = 1.0
    intercept: float = 0.0

    def to_stored(self, hu: float) -> float:
        """The stored value that maps to `hu` (to threshold raw data without converting it)."""
        return (hu - self.intercept) / self.slope


def decide_rescale(stored_min: float, meta: VolumeMeta | None, rule: str = "auto") -> HURescale:
    """Pick the rescale for a volume whose smallest stored value is `stored_min`.

    Rules: 'raw' forces the CSV slope/intercept, 'hu' forces identity, 'auto' applies the CSV
    only when it looks like a CT-RATE v1 raw volume (min >= 0 and CSV intercept < 0).
    Returned rule names: 'hu' (auto: already HU), 'hu-forced', 'raw-metadata' (auto: v1 raw),
    'raw-forced'.
    """
    if rule not in RULES:
        raise HURuleError(f"hu_rule must be one of {', '.join(RULES)}, got '{rule}'")
    has_csv = meta is not None and meta.intercept is not None
    slope = 1.0 if meta is None or meta.slope is None else float(meta.slope)
    intercept = 0.0 if not has_csv else float(meta.intercept)  # type: ignore[union-attr]
    if has_csv and not slope > 0:
        raise HURuleError(f"metadata RescaleSlope must be positive, got {slope}")
    if rule == "hu":
        return HURescale("hu-forced")
    if rule == "raw":
        if not has_csv:
            raise HURuleError("hu_rule=raw needs RescaleIntercept (and RescaleSlope) from the metadata CSV")
        return HURescale("raw-forced", slope, intercept)
    if has_csv and stored_min >= 0 and intercept < 0:
        return HURescale("raw-metadata", slope, intercept)
    return HURescale("hu")


def apply_rescale(array: np.ndarray, rescale: HURescale) -> np.ndarray:
    """float32 HU; modifies `array` in place when it already is a writable float32 array."""
    out = array if array.dtype == np.float32 and array.flags.writeable else array.astype(np.float32)
    if rescale.slope != 1.0:
        out *= np.float32(rescale.slope)
    if rescale.intercept != 0.0:
        out += np.float32(rescale.intercept)
    return out


def to_hu(array: np.ndarray, meta: VolumeMeta | None, rule: str = "auto") -> tuple[np.ndarray, str]:
    """float32 HU (a new array) and the rule applied (see `decide_rescale`)."""
    rescale = decide_rescale(float(array.min()) if array.size else 0.0, meta, rule)
    return apply_rescale(np.array(array, dtype=np.float32), rescale), rescale.rule


def clamp_padding(hu: np.ndarray, air_hu: float = -1024.0) -> np.ndarray:
    """Values below air (DICOM padding -2048, -3024 outside the reconstruction circle) -> air.

    Without this, padding averaged with tissue at the field-of-view edge reads as lung or fat."""
    return np.maximum(hu, np.asarray(air_hu, dtype=hu.dtype))
