"""Shared pieces of the benchmarks: arguments, thread limits, machine description, CT-RATE-size
data and stores (generated once into a cache directory and reused), result output.

Every benchmark prints a rich table, writes `<out>/<name>.json`, and with `--json` prints the same
object as the LAST line of stdout, so a script can read it with `stdout.splitlines()[-1]`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repository
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "results"
REALCT = REPO.parent / "shared" / "realct"
DEFAULT_DATA = REPO / "bench" / ".data"
PYTHON = sys.executable


# ------------------------------------------------------------------------------------ arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small version (a few minutes on 2 cores)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last stdout line")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="for <name>.json (default bench/results)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="cache of generated volumes and stores, reused between runs (default bench/.data)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--scale", choices=("ctrate", "anatomy", "small"), default="ctrate",
                   help="generated volumes: ctrate (512x512, 200-300 slices), anatomy (the real thorax of "
                        "../shared/realct at 256x256, 110-141 slices) or small (smoke tests only)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override (repeatable), e.g. preprocess.compressor=blosc-lz4")
    return p


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return name


def limit_threads(n: int) -> None:
    """Cap the thread pools of this process (torch, OpenCV, OpenMP/BLAS in children) at `n`."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(n)
    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(n)


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (CPU model, cores, memory, load, GPU, library versions)."""
    info: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    with contextlib.suppress(OSError, AttributeError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------------- data


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


# ---------------------------------------------------------------------------------------- stores


def ctprep_command() -> list[str]:
    """The `ctprep` console script beside this interpreter, else `python -m ctprep`."""
    script = Path(PYTHON).with_name("ctprep")
    return [str(script)] if script.is_file() else [PYTHON, "-m", "ctprep"]


def build_store_cli(data: BenchData, out: Path, workers: int, config: Path | None = None,
                    extra: tuple[str, ...] = ()) -> float:
    """Run `ctprep build-cache` in a subprocess; returns its wall time in seconds (whole process)."""
    cmd = [*ctprep_command(), "build-cache", "--data-dir", str(data.root / "dataset"), "--labels",
           str(data.labels_csv), "--out", str(out), "--workers", str(workers), *extra]
    if data.metadata_csv is not None:
        cmd += ["--metadata", str(data.metadata_csv)]
    if config is not None:
        cmd += ["--config", str(config)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"build-cache failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}"
                           f"\n{proc.stdout[-2000:]}")
    return seconds


def ensure_store(data: BenchData, cache: Path, config: Path | None = None, overrides: list[str] | None = None,
                 workers: int = 2) -> Path:
    """A store of `data` built once with `config`'s preprocess section (plus `--set` overrides) and
    reused: its name carries the config fingerprint, and `build-cache` skips rows already written."""
    from ctprep.config import load_preprocess
    from ctprep.store import fingerprint

    overrides = list(overrides or [])
    out = cache / f"{data.root.name}-{fingerprint(load_preprocess(config, overrides))[:10]}.zarr"
    if not (out / "zarr.json").exists():
        log(f"building the store {out} (once; reused later)")
    build_store_cli(data, out, workers, config, set_args(overrides))
    return out


def set_args(overrides: list[str] | None) -> tuple[str, ...]:
    """`--set k=v` pairs for the ctprep command line."""
    return tuple(a for o in overrides or [] for a in ("--set", o))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))
    env["COLUMNS"] = "200"
    return env


# ---------------------------------------------------------------------------------------- output


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then `t["s"]` is the elapsed wall time."""
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - start


def log(text: str) -> None:
    """Progress on stderr, so stdout stays the table and (with --json) the JSON line."""
    print(text, file=sys.stderr, flush=True)


def emit(name: str, result: dict[str, Any], args: argparse.Namespace, rows: list[tuple[str, ...]],
         columns: tuple[str, ...], title: str) -> None:
    """Print the table, write `<out>/<name>.json`; with --json the JSON object is the last stdout line."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    else:
        print(f"wrote {path}")


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
