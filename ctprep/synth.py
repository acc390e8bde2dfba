"""`ctprep synth`: synthetic chest CT with learnable findings, written in the CT-RATE layout.

OUT_DIR plays the role of CT-RATE's `dataset/`:

    train/train_P/train_P_S/train_P_S_R.nii.gz              P patient (from 1), S scan a/b, R recon 1/2
    multi_abnormality_labels/train_predicted_labels.csv     VolumeName, then the 18 LABEL_NAMES (0/1)
    metadata/train_metadata.csv                             VolumeName, ..., XYSpacing, ZSpacing,
                                                            RescaleIntercept, RescaleSlope, ...

Each patient has 1-2 scans, each scan 1-2 reconstructions. Reconstructions of one scan share the
anatomy, findings and labels and differ in slice spacing, noise and kernel sharpness; scans of one
patient share the anatomy (and the place of any finding), each label flipping with small probability.
Volumes are v1 raw (stored = HU + 1024, min >= 0) with probability `v1_fraction`, else v2 HU; the
metadata says RescaleSlope 1, RescaleIntercept -1024 for both, as CT-RATE's CSV does.

Rendered labels (see `synth_findings`): all 18. The last five (Pulmonary fibrotic sequela, Mosaic
attenuation pattern, Peribronchial thickening, Bronchiectasis, Interlobular septal thickening) are
fine-textured and the hardest to learn at ~4 mm; `labels=` restricts rendering to a subset (the
others are then always 0).

Determinism: every random draw comes from `numpy.random.default_rng` seeded by
(seed, patient[, scan[, reconstruction]]) or (seed, patient, label), so one seed gives
byte-identical CSVs and identical voxel arrays, whatever the order volumes are written in.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctprep.naming import LABEL_NAMES
from ctprep.synth_anatomy import Anatomy, Contrast, draw_anatomy, draw_contrast
from ctprep.synth_findings import RENDERED, draw_findings, finding_hooks, scene_with_findings
from ctprep.synth_geometry import Grid
from ctprep.synth_render import render

SPLIT = "train"
METADATA_COLUMNS = ("VolumeName", "Manufacturer", "PatientSex", "PatientAge", "Rows", "Columns",
                    "NumberofSlices", "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope",
                    "ImagePositionPatient", "ImageOrientationPatient")
SCALES = {  # in-plane pixels, pixel mm, slices, slice mm
    "small": ((128, 192), (1.8, 2.8), (40, 90), (2.5, 5.0)),
    "ctrate": ((512, 512), (0.6, 0.9), (200, 300), (1.0, 1.5)),
}
_SCAN_FLIP = 0.12  # chance that a label differs between two scans of one patient


class SynthError(ValueError):
    """Bad arguments to the generator."""


@dataclass(frozen=True, eq=False)
class ScanSpec:
    """Everything one scan shows; its reconstructions only resample it."""

    patient: int
    scan: str
    anatomy: Anatomy
    labels: tuple[int, ...]       # 0/1 per LABEL_NAMES
    findings: dict[str, Any]      # per-label geometry (drawn per patient, used when the label is 1)
    contrast: Contrast
    table: bool
    angle: float                  # in-plane rotation of the patient, rad
    shift: tuple[float, float]    # body centre in the scanner frame, mm
    table_z: float                # scanner z of the carina, mm
    pixels: int
    pixel_mm: float
    z_range: tuple[float, float]  # patient z covered (lung apex to upper abdomen)
    sex: str
    age: int

    @property
    def scan_id(self) -> str:
        return f"{SPLIT}_{self.patient}_{self.scan}"


@dataclass(frozen=True)
class ReconSpec:
    """One reconstruction of a scan: the first is sharp and noisy (lung kernel), the second smooth."""

    name: str        # VolumeName with .nii.gz
    slices: int
    slice_mm: float
    noise_hu: float  # image noise SD after the kernel
    kernel_px: float  # Gaussian kernel sigma in-plane, pixels (sharp lung vs soft tissue kernels)
    raw: bool        # stored as CT-RATE v1 raw values (HU + 1024)
    noise_seed: int


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, *keys]))


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise SynthError(f"scale must be one of {sorted(SCALES)}, got '{scale}'")


def make_scans(seed: int, patient: int, *, scale: str = "small",
               labels: Sequence[str] | None = None) -> list[ScanSpec]:
    """The 1-2 scans of one patient (deterministic in seed and patient)."""
    _check_scale(scale)
    allowed = set(RENDERED if labels is None else labels) & set(RENDERED)
    prng = _rng(seed, patient)
    anatomy = draw_anatomy(prng)
    base = prng.random(len(LABEL_NAMES))
    n_scans = 1 + int(prng.random() < 0.5)
    sex, age = str(prng.choice(["M", "F"])), int(prng.integers(25, 90))
    findings = draw_findings(lambda i: _rng(seed, patient, 1000 + i), anatomy)
    scans = []
    for s in range(n_scans):
        srng = _rng(seed, patient, s + 1)
        flips = srng.random(len(LABEL_NAMES)) < (_SCAN_FLIP if s else 0.0)
        flags = tuple(int(((base[i] < RENDERED.get(name, 0.0)) ^ flips[i]) and name in allowed)
                      for i, name in enumerate(LABEL_NAMES))
        scans.append(_scan_geometry(srng, scale, patient, "ab"[s], anatomy, flags, findings, sex, age))
    return scans


def _scan_geometry(rng: np.random.Generator, scale: str, patient: int, scan: str, an: Anatomy,
                   flags: tuple[int, ...], findings: dict, sex: str, age: int) -> ScanSpec:
    (n_lo, n_hi), (mm_lo, mm_hi), _, _ = SCALES[scale]
    contrast, table = draw_contrast(rng), bool(rng.random() < 0.8)
    angle = math.radians(rng.uniform(-5, 5))
    n = int(rng.integers(n_lo, n_hi + 1))
    width = 2 * an.a * rng.uniform(1.08, 1.3)
    n = max(n, min(n_hi, math.ceil(width / mm_hi)))
    pixel_mm = round(float(np.clip(width / n, mm_lo, mm_hi)), 4)
    shift = (rng.uniform(-0.04, 0.04) * n * pixel_mm, rng.uniform(-0.06, 0.02) * n * pixel_mm)
    z_range = (an.z_bot - rng.uniform(15, 35), an.z_top + rng.uniform(15, 35))
    return ScanSpec(patient, scan, an, flags, findings, contrast, table, angle, shift,
                    rng.uniform(-400, -100), n, pixel_mm, z_range, sex, age)


def make_recons(scan: ScanSpec, seed: int, *, scale: str = "small",
                v1_fraction: float = 0.3) -> list[ReconSpec]:
    """The 1-2 reconstructions of a scan: same anatomy, own slice spacing, noise, kernel, storage."""
    _check_scale(scale)
    _, _, (nz_lo, nz_hi), (mm_lo, mm_hi) = SCALES[scale]
    srng = _rng(seed, scan.patient, "ab".index(scan.scan) + 1, 99)
    extent = scan.z_range[1] - scan.z_range[0]
    out = []
    for r in range(1 + int(srng.random() < 0.65)):
        rng = _rng(seed, scan.patient, "ab".index(scan.scan) + 1, r + 1)
        slice_mm = round(float(np.clip(extent / rng.uniform(nz_lo, nz_hi), mm_lo, mm_hi)), 3)
        slices = int(np.clip(math.ceil(extent / slice_mm), nz_lo, nz_hi))
        sharp = r == 0
        noise = rng.uniform(14, 28) if sharp else rng.uniform(6, 14)
        out.append(ReconSpec(f"{scan.scan_id}_{r + 1}.nii.gz", slices, slice_mm,
                             float(noise * (scan.anatomy.a / 160) ** 1.5),
                             rng.uniform(0.3, 0.5) if sharp else rng.uniform(0.7, 1.1),
                             bool(rng.random() < v1_fraction), int(rng.integers(2**31))))
    return out


def recon_grid(scan: ScanSpec, recon: ReconSpec) -> tuple[Grid, tuple[float, ...], tuple[float, ...]]:
    """Grid (body-centred), reconstruction circle (cx, cy, r) and the LPS origin of the NIfTI."""
    n, s = scan.pixels, scan.pixel_mm
    scanner = (np.arange(n) - (n - 1) / 2) * s
    bx, by = scan.shift
    z0 = (scan.z_range[0] + scan.z_range[1]) / 2 - (recon.slices - 1) / 2 * recon.slice_mm
    z = z0 + np.arange(recon.slices) * recon.slice_mm
    grid = Grid(z, scanner - by, scanner - bx, scan.angle)
    origin = (round(float(scanner[0]), 3), round(float(scanner[0]), 3), round(z0 + scan.table_z, 3))
    return grid, (-bx, -by, n * s / 2), origin


def render_hu(scan: ScanSpec, recon: ReconSpec) -> np.ndarray:
    """HU volume (int16, z-y-x) of one reconstruction, before any v1 offset."""
    grid, (cx, cy, radius), _ = recon_grid(scan, recon)
    flags = dict(zip(LABEL_NAMES, scan.labels, strict=True))
    scene = scene_with_findings(scan.anatomy, scan.contrast, scan.table, flags, scan.findings)
    hu = render(scene, grid, finding_hooks(flags, scan.findings))
    outside = (grid.x[None, :] - cx) ** 2 + (grid.y[:, None] - cy) ** 2 > radius**2
    return _reconstruct(hu, recon, outside)


def _gaussian(sigma: float) -> np.ndarray:
    w = np.exp(-0.5 * (np.arange(-int(3 * sigma + 0.5), int(3 * sigma + 0.5) + 1) / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def _reconstruct(hu: np.ndarray, recon: ReconSpec, outside: np.ndarray) -> np.ndarray:
    """Add white noise, then a separable Gaussian standing in for the reconstruction kernel and
    slice thickness (which also makes the noise correlated, as in CT); -1024 outside the
    reconstruction circle; int16. Works slice by slice to keep memory at one float volume."""
    import cv2

    kz, kxy = _gaussian(0.45), _gaussian(recon.kernel_px)
    gain = float(np.sqrt((kz**2).sum()) * (kxy**2).sum())  # noise SD the kernel lets through
    rng = np.random.default_rng(recon.noise_seed)
    for k in range(hu.shape[0]):
        hu[k] += rng.standard_normal(hu.shape[1:], dtype=np.float32) * np.float32(recon.noise_hu / gain)
    out = np.empty(hu.shape, dtype=np.int16)
    half = len(kz) // 2
    for k in range(hu.shape[0]):
        acc = sum(w * hu[min(max(k + i - half, 0), hu.shape[0] - 1)] for i, w in enumerate(kz))
        acc = cv2.sepFilter2D(acc, -1, kxy, kxy, borderType=cv2.BORDER_REPLICATE)
        acc[outside] = -1024
        out[k] = np.clip(np.rint(acc), -1024, 3071)
    return out


def write_volume(path: Path, scan: ScanSpec, recon: ReconSpec) -> None:
    """Write one reconstruction as .nii.gz (LPS identity direction, spacing and origin in mm)."""
    import SimpleITK as sitk

    hu = render_hu(scan, recon)
    stored = hu + np.int16(1024) if recon.raw else hu
    image = sitk.GetImageFromArray(stored)
    image.SetSpacing((scan.pixel_mm, scan.pixel_mm, recon.slice_mm))
    image.SetOrigin(recon_grid(scan, recon)[2])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part.nii.gz")  # a crash never leaves a half-written volume
    sitk.WriteImage(image, str(tmp), useCompression=True)
    tmp.replace(path)


def _fmt(v: float) -> str:
    return format(v, ".10g")


def metadata_row(name: str, manufacturer: str, sex: str, age: int, pixels: int, slices: int, pixel_mm: float,
                 slice_mm: float, origin: Sequence[float]) -> list[str]:
    """One METADATA_COLUMNS row, formatted as CT-RATE's CSV (RescaleIntercept -1024, slope 1)."""
    s = _fmt(pixel_mm)
    position = ", ".join(_fmt(v) for v in origin)
    return [name, manufacturer, sex, f"{age:03d}Y", str(pixels), str(pixels), str(slices), f"[{s}, {s}]",
            _fmt(slice_mm), "-1024", "1", f"[{position}]", "[1, 0, 0, 0, 1, 0]"]


def _metadata_row(scan: ScanSpec, recon: ReconSpec) -> list[str]:
    return metadata_row(recon.name, "SYNTH", scan.sex, scan.age, scan.pixels, recon.slices, scan.pixel_mm,
                        recon.slice_mm, recon_grid(scan, recon)[2])


def _write_csv(path: Path, header: Sequence[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _volume_path(out_dir: Path, scan: ScanSpec, recon: ReconSpec) -> Path:
    return out_dir / SPLIT / f"{SPLIT}_{scan.patient}" / scan.scan_id / recon.name


def _write_task(task: tuple[Path, ScanSpec, ReconSpec]) -> str:
    path, scan, recon = task
    write_volume(path, scan, recon)
    return recon.name


def synthesize(out_dir: Path, patients: int = 40, seed: int = 0, *, scale: str = "small",
               v1_fraction: float = 0.3, progress: bool = True, workers: int | None = None,
               labels: Sequence[str] | None = None, anatomy: Sequence[str | Path] | None = None) -> dict:
    """Write a CT-RATE-layout dataset; return a summary dict (volumes, patients, per-label positives,
    v1/v2 counts and names, paths of the labels and metadata CSVs, seconds).

    `workers` processes write volumes (default: up to 4, one per core; the output is identical for
    any number); `labels` restricts rendering to those label names (the others stay 0);
    `anatomy` (paths of real chest CT scans) paints the findings onto those scans instead of the
    synthetic anatomy (`ctprep.synth_real_scan`)."""
    if patients < 1:
        raise SynthError(f"patients must be >= 1, got {patients}")
    if not 0.0 <= v1_fraction <= 1.0:
        raise SynthError(f"v1_fraction must be in [0, 1], got {v1_fraction}")
    unknown = sorted(set(labels or ()) - set(LABEL_NAMES))
    if unknown:
        raise SynthError(f"unknown label(s) {unknown}; choose from LABEL_NAMES")
    if anatomy:
        from ctprep.synth_real_scan import synthesize_real

        return synthesize_real(Path(out_dir), [str(a) for a in anatomy], patients, seed, scale=scale,
                               v1_fraction=v1_fraction, progress=progress, workers=workers, labels=labels)
    start, out_dir = time.perf_counter(), Path(out_dir)
    tasks = []
    for p in range(1, patients + 1):
        for scan in make_scans(seed, p, scale=scale, labels=labels):
            for recon in make_recons(scan, seed, scale=scale, v1_fraction=v1_fraction):
                tasks.append((_volume_path(out_dir, scan, recon), scan, recon))
    if workers is None:
        workers = 1 if len(tasks) < 8 else min(4, os.cpu_count() or 1)
    run_tasks(_write_task, tasks, workers, progress)
    rows = [(recon.name, scan.labels, _metadata_row(scan, recon), recon.raw) for _, scan, recon in tasks]
    summary = write_tables(out_dir, rows, patients, len({scan.scan_id for _, scan, _ in tasks}))
    return summary | {"seconds": round(time.perf_counter() - start, 2)}


def write_tables(out_dir: Path, rows: Sequence[tuple[str, Sequence[int], list[str], bool]], patients: int,
                 scans: int) -> dict:
    """The labels and metadata CSVs from (VolumeName, labels, metadata row, stored raw) per volume,
    and the summary `synthesize` returns (without its timing)."""
    labels_csv = out_dir / "multi_abnormality_labels" / f"{SPLIT}_predicted_labels.csv"
    metadata_csv = out_dir / "metadata" / f"{SPLIT}_metadata.csv"
    _write_csv(labels_csv, ["VolumeName", *LABEL_NAMES], [[name, *map(str, labels)] for name, labels, _, _ in rows])
    _write_csv(metadata_csv, METADATA_COLUMNS, [meta for _, _, meta, _ in rows])
    v1 = [name for name, _, _, raw in rows if raw]
    return {
        "out_dir": str(out_dir), "volumes": len(rows), "patients": patients, "scans": scans,
        "positives": {name: sum(int(r[1][i]) for r in rows) for i, name in enumerate(LABEL_NAMES)},
        "v1_volumes": len(v1), "v2_volumes": len(rows) - len(v1), "v1_names": v1,
        "labels_csv": str(labels_csv), "metadata_csv": str(metadata_csv),
    }


def run_tasks(fn: Callable[[Any], Any], tasks: list, workers: int, progress: bool,
              describe: Callable[[Any], str] = str) -> list:
    """`fn` over `tasks` (in order) in `workers` forked processes, with a progress bar; the results."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.description}"))
    results = []
    with Progress(*columns, disable=not progress) as bar:
        job = bar.add_task("", total=len(tasks))
        if workers <= 1:
            for result in map(fn, tasks):
                results.append(result)
                bar.update(job, advance=1, description=describe(result))
            return results
        # fork: workers inherit the imported modules (and any cached background) and never re-run
        # the CLI's __main__
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for result in pool.map(fn, tasks, chunksize=1):
                results.append(result)
                bar.update(job, advance=1, description=describe(result))
    return results
