"""`ctprep synth --anatomy PATH`: a CT-RATE-layout data set on real chest CT with inserted findings.

Per patient: one background (the `--anatomy` scans in turn), a body-size scale (0.9-1.1 in-plane,
0.92-1.08 in z), a smooth random deformation (B-spline, 3x3x3 control points, 3-7 mm) and the
geometry of every finding (drawn from a generator seeded by seed, patient and label, so it stays
in place across the patient's scans). Per scan: its labels (each label flips between a
patient's scans with probability 0.12), an in-plane rotation of +-8 degrees, a tilt of +-3
degrees, a shift of +-15 mm, a z range cut 0-15 mm into each end of the background, the field of
view. Per reconstruction: slice thickness, noise, kernel sharpness and storage (v1 raw or v2 HU),
exactly as in `ctprep.synth`.

Findings are painted once per scan on the background's working grid (`ctprep.synth_real_*`),
then every reconstruction is resampled from it through (deformation o affine) with a slice-profile
blur along z, and gets noise and its kernel. A label is 1 exactly when its painter changed voxels
inside the scan's z range: a finding that could not be placed, or fell outside the scan, is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctprep import synth_real_chest as chest
from ctprep import synth_real_lung as lung
from ctprep.naming import LABEL_NAMES
from ctprep.synth import SPLIT, ReconSpec, _reconstruct, _rng, metadata_row
from ctprep.synth_findings import RENDERED
from ctprep.synth_real import Background, load_background
from ctprep.synth_real_paint import Canvas

# Painters in the order they are applied: the enlarged heart first (it moves everything near it),
# then patterns of the parenchyma, space-occupying lung findings, mediastinum, bright objects last.
PAINTERS: dict[str, Callable[[Canvas, np.random.Generator], None]] = {
    "Cardiomegaly": chest.cardiomegaly,
    "Pericardial effusion": chest.pericardial_effusion,
    "Mosaic attenuation pattern": lung.mosaic_attenuation,
    "Emphysema": lung.emphysema,
    "Lung opacity": lung.lung_opacity,
    "Interlobular septal thickening": lung.septal_thickening,
    "Peribronchial thickening": lung.peribronchial_thickening,
    "Bronchiectasis": lung.bronchiectasis,
    "Pulmonary fibrotic sequela": lung.fibrotic_sequela,
    "Atelectasis": lung.atelectasis,
    "Lung nodule": lung.lung_nodule,
    "Consolidation": lung.consolidation,
    "Pleural effusion": lung.pleural_effusion,
    "Hiatal hernia": chest.hiatal_hernia,
    "Lymphadenopathy": chest.lymphadenopathy,
    "Arterial wall calcification": chest.arterial_calcification,
    "Coronary artery wall calcification": chest.coronary_calcification,
    "Medical material": chest.medical_material,
}
REAL_SCALES = {  # in-plane pixels, slice mm of the sharp and of the smooth reconstruction
    "tiny": (96, (3.0, 4.0), (4.0, 6.0)),   # tests: seconds per volume
    "small": (256, (1.5, 3.0), (2.5, 5.0)),
    "ctrate": (512, (1.0, 1.5), (1.0, 1.5)),
}
_SCAN_FLIP = 0.12


@dataclass(frozen=True)
class RealScan:
    """One scan of one patient on a real background (everything but the painted findings)."""

    patient: int
    scan: str
    anatomy: str
    drawn: tuple[int, ...]       # labels drawn for this scan (0/1 per LABEL_NAMES), before painting
    scale: tuple[float, float, float]  # (x, y, z) body size factor
    warp_seed: int
    warp_mm: float
    angle: float                 # rad, about z
    tilt: float                  # rad, about x
    shift: tuple[float, float]   # (x, y) mm
    crop_mm: tuple[float, float]  # cut from the bottom and the top of the background
    fov_extra: float             # field of view = lung width x this
    sex: str
    age: int

    @property
    def scan_id(self) -> str:
        return f"{SPLIT}_{self.patient}_{self.scan}"


def make_real_scans(seed: int, patient: int, anatomy: Sequence[str], *,
                    labels: Sequence[str] | None = None) -> list[RealScan]:
    """The 1-2 scans of one patient (deterministic in seed and patient)."""
    allowed = set(PAINTERS if labels is None else labels)
    prng = _rng(seed, patient, 7)
    source = str(anatomy[(patient - 1) % len(anatomy)])
    base = prng.random(len(LABEL_NAMES))
    n_scans = 1 + int(prng.random() < 0.5)
    sex, age = str(prng.choice(["M", "F"])), int(prng.integers(25, 90))
    s_xy = prng.uniform(0.9, 1.1)
    scale = (s_xy * prng.uniform(0.97, 1.03), s_xy * prng.uniform(0.97, 1.03), prng.uniform(0.92, 1.08))
    warp_seed, warp_mm = int(prng.integers(2**31)), prng.uniform(3, 7)
    scans = []
    for s in range(n_scans):
        srng = _rng(seed, patient, s + 1, 7)
        flips = srng.random(len(LABEL_NAMES)) < (_SCAN_FLIP if s else 0.0)
        drawn = tuple(int(((base[i] < RENDERED[name]) ^ flips[i]) and name in allowed)
                      for i, name in enumerate(LABEL_NAMES))
        scans.append(RealScan(patient, "ab"[s], source, drawn, scale, warp_seed, warp_mm,
                              math.radians(srng.uniform(-8, 8)), math.radians(srng.uniform(-3, 3)),
                              (srng.uniform(-15, 15), srng.uniform(-15, 15)),
                              (srng.uniform(0, 15), srng.uniform(0, 15)), srng.uniform(1.45, 1.7), sex, age))
    return scans


def make_real_recons(scan: RealScan, seed: int, *, scale: str = "small", v1_fraction: float = 0.3) -> list[ReconSpec]:
    """1-2 reconstructions: a sharp, noisy thin one and (65 %) a smooth, thicker one."""
    _, sharp_mm, smooth_mm = REAL_SCALES[scale]
    srng = _rng(seed, scan.patient, "ab".index(scan.scan) + 1, 98)
    out = []
    for r in range(1 + int(srng.random() < 0.65)):
        rng = _rng(seed, scan.patient, "ab".index(scan.scan) + 1, r + 1, 98)
        sharp = r == 0
        slice_mm = round(float(rng.uniform(*(sharp_mm if sharp else smooth_mm))), 3)
        noise = rng.uniform(14, 28) if sharp else rng.uniform(6, 14)
        out.append(ReconSpec(f"{scan.scan_id}_{r + 1}.nii.gz", 0, slice_mm, float(noise),
                             rng.uniform(0.3, 0.5) if sharp else rng.uniform(0.7, 1.1),
                             bool(rng.random() < v1_fraction), int(rng.integers(2**31))))
    return out


def paint_scan(bg: Background, scan: RealScan, seed: int) -> Canvas:
    """The background with the scan's drawn findings painted in."""
    cv = Canvas.of(bg)
    for name, painter in PAINTERS.items():
        i = LABEL_NAMES.index(name)
        if scan.drawn[i]:
            painter(cv, _rng(seed, scan.patient, 1000 + i))
    return cv


# ------------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class OutputGrid:
    pixels: int
    pixel_mm: float
    slices: int
    slice_mm: float
    origin: tuple[float, float, float]  # (x, y, z) mm, LPS, identity direction
    z_range: tuple[int, int]            # background slices the scan covers (for label visibility)


def _centre_mm(bg: Background) -> np.ndarray:
    """(x, y, z) mm of the middle of the lungs: the centre of rotation and of the field of view."""
    idx = np.argwhere(bg.lung[:: 4, :: 4, :: 4] > 0) * 4
    mid = (idx.min(axis=0) + idx.max(axis=0)) / 2
    zyx = bg.mm(mid)
    return np.array([zyx[2], zyx[1], zyx[0]])


def output_grid(bg: Background, scan: RealScan, recon: ReconSpec, pixels: int) -> OutputGrid:
    centre = _centre_mm(bg)
    xs = np.flatnonzero((bg.lung > 0).any(axis=(0, 1)))
    fov = (xs[-1] - xs[0] + 1) * bg.spacing[2] * scan.fov_extra
    if bg.cropped:  # no body outline: the field of view is the background's own
        fov = min(fov, bg.shape[2] * bg.spacing[2], bg.shape[1] * bg.spacing[1])
    pixel_mm = round(fov / pixels, 4)
    z0 = bg.origin[0] + scan.crop_mm[0]
    z1 = bg.origin[0] + (bg.shape[0] - 1) * bg.spacing[0] - scan.crop_mm[1]
    slices = max(8, int((z1 - z0) / recon.slice_mm) + 1)
    half = (pixels - 1) / 2 * pixel_mm
    origin = (centre[0] - half, centre[1] - half, z0)
    lo = int((z0 - bg.origin[0]) / bg.spacing[0] + 5 / bg.spacing[0])  # 5 mm margin for the tilt
    hi = int((z0 + (slices - 1) * recon.slice_mm - bg.origin[0]) / bg.spacing[0] - 5 / bg.spacing[0]) + 1
    return OutputGrid(pixels, pixel_mm, slices, recon.slice_mm, origin, (lo, hi))


def _transform(bg: Background, scan: RealScan, image):
    """Output point -> background point: the patient's deformation after the scan's affine."""
    import SimpleITK as sitk

    c, s = math.cos(scan.angle), math.sin(scan.angle)
    ct, st = math.cos(scan.tilt), math.sin(scan.tilt)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, ct, -st], [0, st, ct]])
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((rot @ np.diag([1 / v for v in scan.scale])).ravel().tolist())
    affine.SetCenter(_centre_mm(bg).tolist())
    affine.SetTranslation((-scan.shift[0], -scan.shift[1], 0.0))
    return sitk.CompositeTransform([_patient_warp(bg, scan), affine])


def _patient_warp(bg: Background, scan: RealScan):
    """The patient's smooth deformation: 4x4x4 random displacements (SD `warp_mm`) over the
    background, upsampled (cubic) to a 10 mm grid and interpolated linearly from there (as cheap
    to evaluate as the affine; a B-spline transform measured 20x slower in `Resample`)."""
    import SimpleITK as sitk
    from scipy import ndimage

    extent = np.array(bg.shape[::-1]) * np.array(bg.spacing[::-1])  # (x, y, z) mm
    size = [int(math.ceil(e / 10.0)) + 1 for e in extent]
    coarse = np.random.default_rng(scan.warp_seed).normal(0, scan.warp_mm, (3, 4, 4, 4))
    zoom = [n / 4 for n in size[::-1]]
    disp = np.stack([ndimage.zoom(coarse[i], zoom, order=3, mode="nearest", grid_mode=True) for i in range(3)],
                    axis=-1)
    field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    field.SetSpacing((10.0, 10.0, 10.0))
    field.SetOrigin((bg.origin[2], bg.origin[1], bg.origin[0]))
    return sitk.DisplacementFieldTransform(field)


def render_recon(cv: Canvas, scan: RealScan, recon: ReconSpec, pixels: int) -> tuple[np.ndarray, OutputGrid]:
    """int16 HU (slices, pixels, pixels) of one reconstruction and its grid."""
    import SimpleITK as sitk

    bg = cv.bg
    grid = output_grid(bg, scan, recon, pixels)
    image = sitk.GetImageFromArray(cv.vol)
    image.SetSpacing((bg.spacing[2], bg.spacing[1], bg.spacing[0]))
    image.SetOrigin((bg.origin[2], bg.origin[1], bg.origin[0]))
    sigma = math.sqrt(max(recon.slice_mm**2 - bg.spacing[0] ** 2, 0.0)) / 2.355  # slice profile
    if sigma > 0.05:
        image = sitk.RecursiveGaussian(image, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, 2)
    out = sitk.Resample(image, (pixels, pixels, grid.slices), _transform(bg, scan, image), sitk.sitkLinear,
                        grid.origin, (grid.pixel_mm, grid.pixel_mm, grid.slice_mm), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                        -1024.0, sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(out)
    yy, xx = np.mgrid[:pixels, :pixels]
    r = (pixels - 1) / 2
    outside = ((yy - r) ** 2 + (xx - r) ** 2 > (r + 0.5) ** 2) if not bg.cropped else np.zeros((pixels, pixels), bool)
    return _reconstruct(hu, recon, outside), grid


def final_labels(cv: Canvas, scan: RealScan, grid: OutputGrid) -> tuple[int, ...]:
    """What the scan shows: a drawn label whose painter changed voxels within the scan's z range."""
    return tuple(int(bool(d) and cv.visible(name, *grid.z_range)) for d, name in zip(scan.drawn, LABEL_NAMES,
                                                                                       strict=True))


def write_real_scan(out_dir: Path, scan: RealScan, recons: list[ReconSpec], seed: int, scale: str
                    ) -> list[tuple[str, tuple[int, ...], list[str]]]:
    """Paint the scan, write its reconstructions; [(VolumeName, labels, metadata row), ...]."""
    import SimpleITK as sitk

    bg = load_background(scan.anatomy)
    cv = paint_scan(bg, scan, seed)
    pixels = REAL_SCALES[scale][0]
    rows, labels = [], None
    for recon in recons:
        hu, grid = render_recon(cv, scan, recon, pixels)
        labels = labels or final_labels(cv, scan, grid)  # the scan's first reconstruction decides
        stored = hu + np.int16(1024) if recon.raw else hu
        image = sitk.GetImageFromArray(stored)
        image.SetSpacing((grid.pixel_mm, grid.pixel_mm, grid.slice_mm))
        image.SetOrigin(grid.origin)
        path = out_dir / SPLIT / f"{SPLIT}_{scan.patient}" / scan.scan_id / recon.name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part.nii.gz")
        sitk.WriteImage(image, str(tmp), useCompression=True)
        tmp.replace(path)
        meta = metadata_row(recon.name, "SYNTH-REAL", scan.sex, scan.age, pixels, grid.slices, grid.pixel_mm,
                            grid.slice_mm, grid.origin)
        rows.append((recon.name, labels, meta))
    return rows


def _scan_task(task: tuple[Path, RealScan, list[ReconSpec], int, str]) -> list[tuple[str, tuple[int, ...], list[str]]]:
    out_dir, scan, recons, seed, scale = task
    return write_real_scan(out_dir, scan, recons, seed, scale)


def synthesize_real(out_dir: Path, anatomy: Sequence[str], patients: int, seed: int, *, scale: str = "small",
                    v1_fraction: float = 0.3, progress: bool = True, workers: int | None = None,
                    labels: Sequence[str] | None = None) -> dict:
    """`ctprep.synth.synthesize` on real backgrounds: same layout, CSVs and summary (plus `anatomy`)."""
    import os
    import time

    from ctprep.synth import SynthError, run_tasks, write_tables
    from ctprep.synth_real import AnatomyError

    if scale not in REAL_SCALES:
        raise SynthError(f"scale must be one of {sorted(REAL_SCALES)}, got '{scale}'")
    start = time.perf_counter()
    for path in anatomy:  # analysed once here, so forked workers inherit the cache
        if not Path(path).exists():
            raise AnatomyError(f"--anatomy {path}: no such file or directory")
        load_background(str(path))
    tasks = []
    for p in range(1, patients + 1):
        for scan in make_real_scans(seed, p, anatomy, labels=labels):
            tasks.append((Path(out_dir), scan, make_real_recons(scan, seed, scale=scale, v1_fraction=v1_fraction),
                          seed, scale))
    if workers is None:
        workers = 1 if len(tasks) < 4 else min(4, os.cpu_count() or 1)
    results = run_tasks(_scan_task, tasks, workers, progress, describe=lambda rows: rows[0][0])
    raw = {recon.name: recon.raw for _, _, recons, _, _ in tasks for recon in recons}
    rows = [(name, lab, meta, raw[name]) for scan_rows in results for name, lab, meta in scan_rows]
    summary = write_tables(Path(out_dir), rows, patients, len(tasks))
    return summary | {"anatomy": list(map(str, anatomy)), "seconds": round(time.perf_counter() - start, 2)}
