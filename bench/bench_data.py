"""The benchmarks' input volumes: CT-RATE-size (or real-anatomy-size) volumes in the CT-RATE
layout with their labels and metadata CSVs, generated once into a cache directory and reused."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import REALCT, log


@dataclass
class BenchData:
    """A CT-RATE-layout directory of int16 .nii.gz volumes plus its labels/metadata CSVs."""

    root: Path
    labels_csv: Path
    metadata_csv: Path | None
    files: list[Path]
    generator: str            # "ctprep.synth" or "bench.simple"

    @property
    def source_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def ensure_data(cache: Path, volumes: int, seed: int = 0, scale: str = "ctrate") -> BenchData:
    """`volumes` CT-RATE-size volumes (512x512 in-plane, 200-300 slices, int16 .nii.gz), generated
    on first use and reused afterwards. `ctprep.synth` draws them when it can be imported;
    otherwise a simple numpy phantom of the same size and noise level is written. scale "small"
    (128-192 pixels, 40-90 slices) is for the smoke tests, never for reported numbers."""
    _ignore_in_git(cache)
    try:
        from ctprep import synth
    except ImportError:
        synth = None
    kind = "synth" if synth is not None else "simple"
    if scale == "anatomy":
        kind = "realct"
    root = cache / f"{scale}-{kind}-n{volumes}-s{seed}"
    done = root / "bench_done.json"
    if done.is_file():
        return _load_data(root, json.loads(done.read_text(encoding="utf-8")))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log(f"generating {volumes} {scale}-size volumes into {root} (once; reused later)")
    start = time.perf_counter()
    if scale == "anatomy":
        meta = _write_anatomy(root, volumes, seed)
    elif synth is not None:
        meta = _write_with_synth(synth, root, volumes, seed, scale)
    else:
        meta = _write_simple(root, volumes, seed, 512 if scale == "ctrate" else 128)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return _load_data(root, meta)


def _load_data(root: Path, meta: dict[str, Any]) -> BenchData:
    return BenchData(root=root, labels_csv=root / meta["labels_csv"],
                     metadata_csv=root / meta["metadata_csv"] if meta.get("metadata_csv") else None,
                     files=[root / f for f in meta["files"]], generator=meta["generator"])


def _write_with_synth(synth: Any, root: Path, volumes: int, seed: int, scale: str) -> dict[str, Any]:
    """ctprep.synth with the fewest patients that give `volumes` volumes; the labels CSV the
    benchmarks use lists exactly the first `volumes` of them."""
    patients, count = 0, 0
    while count < volumes:
        patients += 1
        count += sum(len(synth.make_recons(s, seed, scale=scale)) for s in
                     synth.make_scans(seed, patients, scale=scale))
    summary = synth.synthesize(root / "dataset", patients, seed, scale=scale, progress=False,
                               workers=min(2, os.cpu_count() or 1))
    with open(summary["labels_csv"], newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, rows = rows[0], rows[1:volumes + 1]
    _write_csv(root / "labels.csv", header, rows)
    files = [_find(root / "dataset", r[0]) for r in rows]
    return {"generator": "ctprep.synth", "labels_csv": "labels.csv",
            "metadata_csv": str(Path(summary["metadata_csv"]).relative_to(root)),
            "files": [str(f.relative_to(root)) for f in files]}


def _find(data: Path, name: str) -> Path:
    hits = list(data.rglob(name))
    if not hits:
        raise FileNotFoundError(f"{data}: synth wrote no {name}")
    return hits[0]


def _write_simple(root: Path, volumes: int, seed: int, size: int) -> dict[str, Any]:
    """Fallback phantom: body, fat, lungs with vessels, spine, table, 20 HU noise, int16 HU."""
    import SimpleITK as sitk

    from ctprep.naming import LABEL_NAMES

    rng = np.random.default_rng(seed)
    files, label_rows, meta_rows = [], [], []
    for i in range(volumes):
        name = f"train_{i + 1}_a_1.nii.gz"
        depth = int(rng.integers(200, 301) if size == 512 else rng.integers(40, 91))
        pixel, slice_mm = float(rng.uniform(0.6, 0.9)) * 512 / size, 1.25 * (1 if size == 512 else 4)
        arr = _simple_phantom(rng, depth, size)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((pixel, pixel, slice_mm))
        path = root / "dataset" / "train" / f"train_{i + 1}" / f"train_{i + 1}_a" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path), useCompression=True, compressionLevel=1)
        files.append(str(path.relative_to(root)))
        label_rows.append([name, *(str(int(v)) for v in rng.integers(0, 2, len(LABEL_NAMES)))])
        meta_rows.append([name, f"[{pixel}, {pixel}]", str(slice_mm), "-1024", "1"])
    _write_csv(root / "labels.csv", ["VolumeName", *LABEL_NAMES], label_rows)
    _write_csv(root / "metadata.csv", ["VolumeName", "XYSpacing", "ZSpacing", "RescaleIntercept",
                                       "RescaleSlope"], meta_rows)
    return {"generator": "bench.simple", "labels_csv": "labels.csv", "metadata_csv": "metadata.csv",
            "files": files}


def _write_anatomy(root: Path, volumes: int, seed: int) -> dict[str, Any]:
    """Real-anatomy-size volumes: the real thorax of ../shared/realct/chest_ct_dicom (512 x 512 x 141,
    0.98 x 0.98 x 2 mm) resampled to 256 x 256 in-plane (1.95 mm), each cut to a random 110-141 of
    its slices and given its own 8 HU noise (so no two files are alike), int16 HU `.nii.gz` written
    by SimpleITK at gzip level 1 like the CT-RATE-size bench volumes. Against those (512 x 512,
    200-300 slices) the decode per volume is ~5x smaller while the preprocessing output (the
    config's shape) is the same, so the build's own costs weigh more: the case issue 9 measured."""
    import SimpleITK as sitk

    from ctprep.io import read_volume
    from ctprep.naming import LABEL_NAMES

    source = REALCT / "chest_ct_dicom"
    if not source.is_dir():
        raise SystemExit(f"error: --scale anatomy needs the real CT samples at {source}")
    chest = read_volume(source)
    rng = np.random.default_rng(seed)
    files, label_rows = [], []
    spacing = [2 * chest.GetSpacing()[0], 2 * chest.GetSpacing()[1], chest.GetSpacing()[2]]
    for i in range(volumes):
        depth = int(rng.integers(110, chest.GetSize()[2] + 1))
        z0 = int(rng.integers(0, chest.GetSize()[2] - depth + 1))
        part = chest[:, :, z0:z0 + depth]
        small = sitk.Resample(part, [256, 256, depth], sitk.Transform(), sitk.sitkLinear, part.GetOrigin(),
                              spacing, part.GetDirection(), -1024, sitk.sitkInt16)
        arr = sitk.GetArrayFromImage(small).astype(np.float32)
        arr += rng.standard_normal(arr.shape, dtype=np.float32) * 8.0
        img = sitk.GetImageFromArray(np.clip(np.rint(arr), -1024, 3071).astype(np.int16))
        img.CopyInformation(small)
        name = f"train_{i + 1}_a_1.nii.gz"
        path = root / "dataset" / "train" / f"train_{i + 1}" / f"train_{i + 1}_a" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path), useCompression=True, compressionLevel=1)
        files.append(str(path.relative_to(root)))
        label_rows.append([name, *(str(int(v)) for v in rng.integers(0, 2, len(LABEL_NAMES)))])
    _write_csv(root / "labels.csv", ["VolumeName", *LABEL_NAMES], label_rows)
    return {"generator": "realct.chest_ct_dicom", "labels_csv": "labels.csv", "metadata_csv": None,
            "files": files}


def _simple_phantom(rng: np.random.Generator, depth: int, size: int = 512) -> np.ndarray:
    out = np.empty((depth, size, size), dtype=np.int16)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) - size / 2) / (size / 2)
    for z in range(depth):
        t = z / depth
        hu = np.full((size, size), -1000.0, dtype=np.float32)
        body = (xx / 0.8) ** 2 + ((yy - 0.05) / 0.6) ** 2
        hu[body < 1.0] = -100.0
        hu[body < 0.8] = 40.0
        lung_r = 0.25 * np.sin(np.pi * min(max(t * 1.2, 0.05), 0.95))
        for cx in (-0.35, 0.35):
            hu[((xx - cx) / 0.22) ** 2 + (yy / (0.4 * lung_r / 0.25 + 1e-3)) ** 2 < 1] = -850.0
        hu[(xx ** 2 + (yy - 0.45) ** 2) < 0.012] = 400.0           # vertebra
        hu[(np.abs(yy - 0.75) < 0.02) & (np.abs(xx) < 0.9)] = 200.0  # table
        hu += rng.standard_normal((size, size), dtype=np.float32) * 20.0
        out[z] = np.clip(np.rint(hu), -1024, 3071)
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _ignore_in_git(cache: Path) -> None:
    """The cache holds gigabytes of generated volumes: a `*` .gitignore keeps it out of git."""
    cache.mkdir(parents=True, exist_ok=True)
    marker = cache / ".gitignore"
    if not marker.exists():
        marker.write_text("*\n", encoding="utf-8")


def volume_metas(data: BenchData) -> list[Any]:
    """`ctprep.hu.VolumeMeta` per file from the metadata CSV (as build-cache reads it), None if absent."""
    from ctprep import inputs
    from ctprep.hu import VolumeMeta

    if data.metadata_csv is None:
        return [None] * len(data.files)
    table, _ = inputs.read_metadata(data.metadata_csv)
    out = []
    for f in data.files:
        entry = table.get(inputs.case_key(f.name))
        v = entry.values if entry is not None and entry.values else None
        out.append(None if v is None else VolumeMeta(slope=v["RescaleSlope"], intercept=v["RescaleIntercept"],
                                                     xy_spacing=v["XYSpacing"], z_spacing=v["ZSpacing"]))
    return out


def file_labels(data: BenchData) -> np.ndarray:
    """uint8 (N, L) labels of `data.files`, in file order."""
    with open(data.labels_csv, newline="", encoding="utf-8") as fh:
        rows = {r[0]: [int(v) for v in r[1:]] for r in list(csv.reader(fh))[1:]}
    return np.array([rows[f.name] for f in data.files], dtype=np.uint8)
