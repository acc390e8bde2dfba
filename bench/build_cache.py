"""build-cache benchmark: `ctprep build-cache` against a bare SimpleITK decode of the same files.

Whole-process wall times, each in a fresh subprocess (interpreter start and imports included on
both sides):

- decode: `python -c "import SimpleITK as sitk; [sitk.GetArrayFromImage(sitk.ReadImage(f)) ...]"`
- build-cache --workers 1 and --workers 2, each into a fresh store;
- a no-op re-run over the finished store (every row written, sources unchanged).

Also: store bytes against source .nii.gz bytes, and where the build's time goes, from the per-stage
timings the pipeline records in each row's `row_info` (the rest of the process time, i.e. start-up,
CSV/metadata parsing, compression, the store write and its read-back check, is "other").
Targets: build --workers 1 <= 1.5x the bare decode on the CT-RATE-size volumes (issue 5) and
<= 1.2x on real-anatomy-size ones (issue 9: `--scale anatomy`, 256 x 256 in-plane, where the decode
is small and the build's own costs weigh more). Run both sizes; each run reports its own.

    python bench/build_cache.py --quick --json
    python bench/build_cache.py --scale anatomy --volumes 31 --json
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import bench_data
import common
import numpy as np

DEFAULT_CONFIG = common.REPO / "configs" / "default.yaml"
DECODE = "import sys, SimpleITK as sitk\n[sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in sys.argv[1:]]\n"
STAGE_ORDER = ("read", "stats", "body", "reduce", "resample", "windows", "clahe", "qc")


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment YAML (preprocess section)")
    p.add_argument("--volumes", type=int, default=None, help="volumes (default 8, quick 4)")
    p.add_argument("--repeats", type=int, default=None, help="runs each, median kept (default 3, quick 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.volumes = args.volumes or (4 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def time_decode(files: list[Path]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([common.PYTHON, "-c", DECODE, *map(str, files)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bare decode failed: {proc.stderr[-2000:]}")
    return seconds


def time_import() -> float:
    """Whole-process time of `python -c "import SimpleITK"`: the bare decode's fixed start-up."""
    start = time.perf_counter()
    subprocess.run([common.PYTHON, "-c", "import SimpleITK"], check=True)
    return time.perf_counter() - start


def time_build(data: bench_data.BenchData, out: Path, workers: int, args: Any, fresh: bool = True) -> float:
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    return common.build_store_cli(data, out, workers, args.config, common.set_args(args.set))


def stage_split(store: Path) -> dict[str, float]:
    """Seconds per pipeline stage summed over the store's rows (from row_info `timings`)."""
    from ctprep.store import open_store

    totals: dict[str, float] = {}
    for info in open_store(store).all_row_info():
        for stage, sec in (info.get("timings") or {}).items():
            totals[stage] = totals.get(stage, 0.0) + float(sec)
    order = [k for k in STAGE_ORDER if k in totals] + sorted(set(totals) - set(STAGE_ORDER))
    return {k: round(totals[k], 3) for k in order}


def time_store_write(data: bench_data.BenchData, config: Path, overrides: list[str], work: Path) -> float:
    """Seconds for `CacheStore.write_row` (compress, write, read back, compare) of one volume."""
    from ctprep.config import load_preprocess
    from ctprep.naming import LABEL_NAMES
    from ctprep.pipeline import preprocess_volume
    from ctprep.store import create_store

    cfg = load_preprocess(config, overrides)
    images = preprocess_volume(data.files[0], cfg, bench_data.volume_metas(data)[0]).images
    path = work / "write-probe.zarr"
    shutil.rmtree(path, ignore_errors=True)
    store = create_store(path, volume_names=["probe"], patient_ids=["probe"],
                         labels=np.zeros((1, len(LABEL_NAMES)), np.uint8), label_names=LABEL_NAMES, cfg=cfg)
    with common.stopwatch() as t:
        store.write_row(0, images, "probe", {})
    shutil.rmtree(path, ignore_errors=True)
    return t["s"]


def codec_limits(data: bench_data.BenchData, store: Path) -> dict[str, float]:
    """Single-thread ceilings, MB/s of uncompressed bytes: gzip inflate of a source file (zlib,
    what SimpleITK's NIfTI reader does), Blosc zstd/lz4 encode and decode of the store's own
    chunks (level 3, no shuffle, 4 slices per chunk as stored), and a plain memory copy."""
    import zlib

    from numcodecs import Blosc

    from ctprep.store import open_store

    raw = data.files[0].read_bytes()
    with common.stopwatch() as t:
        inflated = zlib.decompress(raw, 47)  # 32 + 15: gzip or zlib header, largest window
    out = {"gzip_inflate": len(inflated) / t["s"] / 1e6}
    vol = np.asarray(open_store(store).array("images")[0])
    chunks = [vol[i:i + 4].tobytes() for i in range(0, vol.shape[0], 4)]
    Blosc.use_threads = False
    for cname in ("zstd", "lz4"):
        codec = Blosc(cname=cname, clevel=3, shuffle=Blosc.NOSHUFFLE)
        with common.stopwatch() as t:
            encoded = [codec.encode(c) for c in chunks]
        out[f"blosc_{cname}_encode"] = vol.nbytes / t["s"] / 1e6
        with common.stopwatch() as t:
            for e in encoded:
                codec.decode(e)
        out[f"blosc_{cname}_decode"] = vol.nbytes / t["s"] / 1e6
        out[f"blosc_{cname}_ratio"] = sum(map(len, encoded)) / vol.nbytes
    with common.stopwatch() as t:
        for _ in range(5):
            vol.copy()
    out["memcpy"] = 5 * vol.nbytes / t["s"] / 1e6
    return {k: round(v, 3 if "ratio" in k else 1) for k, v in out.items()}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = bench_data.ensure_data(args.data, args.volumes, args.seed, args.scale)
    work = args.data / "build-bench"
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[float]] = {"decode": [], "build_w1": [], "build_w2": [], "noop_w1": [], "import": []}
    for r in range(args.repeats):
        common.log(f"round {r + 1}/{args.repeats}: bare decode, build-cache -j1, no-op re-run, -j2")
        runs["import"].append(time_import())
        runs["decode"].append(time_decode(data.files))
        runs["build_w1"].append(time_build(data, work / "w1.zarr", 1, args))
        runs["noop_w1"].append(time_build(data, work / "w1.zarr", 1, args, fresh=False))
        runs["build_w2"].append(time_build(data, work / "w2.zarr", 2, args))
    t = {k: _median(v) for k, v in runs.items()}
    n = len(data.files)
    stages = stage_split(work / "w1.zarr")
    store_bytes = _dir_bytes(work / "w1.zarr")
    result = {
        "volumes": n, "source_bytes": data.source_bytes, "store_bytes": store_bytes,
        "store_over_source": round(store_bytes / data.source_bytes, 4),
        "decode_s": t["decode"], "build_w1_s": t["build_w1"], "build_w2_s": t["build_w2"],
        "noop_s": t["noop_w1"], "import_sitk_s": t["import"],
        "build_over_decode": round(t["build_w1"] / t["decode"], 3),
        "build_w2_over_decode": round(t["build_w2"] / t["decode"], 3),
        "per_volume_s": {k: round(v / n, 3) for k, v in t.items()},
        "stages_s": stages, "write_s": round(time_store_write(data, args.config, args.set, work), 3),
        "limits_MBps": codec_limits(data, work / "w1.zarr"),
        "runs": runs, "repeats": args.repeats, "config": str(args.config), "set": args.set,
        "quick": args.quick,
        "data": {"generator": data.generator, "scale": args.scale,
                 "files": [str(f.relative_to(data.root)) for f in data.files]},
        "machine": common.machine_info(),
    }
    size = {"ctrate": "CT-RATE-size", "anatomy": "real-anatomy-size (256x256)", "small": "small (smoke)"}
    common.emit("build_cache", result, args, _rows(result), ("measurement", "seconds", "per volume", "note"),
                f"build-cache vs bare decode: {n} {size[args.scale]} volumes, whole process, "
                f"median of {args.repeats}")
    return result


def _rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    pv, n, total = r["per_volume_s"], r["volumes"], r["build_w1_s"]
    size = f"{r['store_bytes'] / 2**20:.1f} MiB / {r['source_bytes'] / 2**20:.1f} MiB"
    rows = [
        ("bare SimpleITK decode", f"{r['decode_s']:.2f}", f"{pv['decode']:.3f}", ""),
        ("build-cache --workers 1", f"{total:.2f}", f"{pv['build_w1']:.3f}",
         f"{r['build_over_decode']:.2f}x decode (target <= {1.2 if r['data']['scale'] == 'anatomy' else 1.5})"),
        ("build-cache --workers 2", f"{r['build_w2_s']:.2f}", f"{pv['build_w2']:.3f}",
         f"{r['build_w2_over_decode']:.2f}x decode"),
        ("no-op re-run (all written)", f"{r['noop_s']:.2f}", "", "build-cache start-up + checks"),
        ("python -c 'import SimpleITK'", f"{r['import_sitk_s']:.2f}", "", "the bare decode's start-up"),
        ("store / source bytes", "", "", f"{size} = {r['store_over_source']:.3f}"),
    ]
    split = {**r["stages_s"], "store write + read-back (in-process)": r["write_s"] * n}
    split["other (start-up, CSVs, planning)"] = total - sum(split.values())
    for stage, sec in split.items():
        rows.append((f"  -j1 {stage}", f"{sec:.2f}", f"{sec / n:.3f}", f"{100 * sec / total:.0f} %"))
    for name, value in r["limits_MBps"].items():
        unit = "" if "ratio" in name else " MB/s"
        rows.append((f"  one-thread ceiling: {name}", "", "", f"{value}{unit}"))
    return rows


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
