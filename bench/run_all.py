"""Run every benchmark, each in its own process, and summarise: `make bench` runs the full ones,
`make bench-quick` the `--quick` smoke versions.

Order: build_cache (generates the shared CT-RATE-size volumes on first use), loader, augment,
train_step. Each script's table is shown as it finishes; its JSON goes to `<out>/<name>.json` and
the headline numbers to `<out>/summary.json`. With --json the last stdout line is the summary.

    python bench/run_all.py                # full; see BENCHMARKS.md for its wall time on 2 cores
    python bench/run_all.py --quick        # smoke run: start-up-bound, not for reported numbers
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import common

SCRIPTS = ("build_cache", "loader", "augment", "train_step")


def run_script(name: str, args: Any) -> tuple[dict[str, Any], float]:
    """Run bench/<name>.py with --json; print its table; return (its JSON, wall seconds)."""
    cmd = [common.PYTHON, str(common.REPO / "bench" / f"{name}.py"), "--json", "--out", str(args.out),
           "--data", str(args.data), "--device", args.device, "--scale", args.scale,
           *(["--quick"] if args.quick else []), *common.set_args(args.set)]
    common.log(f"== {name}: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=common.REPO)  # stderr passes through
    seconds = time.perf_counter() - start
    lines = proc.stdout.rstrip("\n").splitlines()
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"error: bench/{name}.py failed (exit code {proc.returncode})")
    print("\n".join(lines[:-1]), flush=True)
    return json.loads(lines[-1]), seconds


def summarise(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    rows = []
    if "build_cache" in results:
        r = results["build_cache"]
        rows += [("build-cache -j1 / bare decode", f"{r['build_over_decode']:.2f}x", "target <= 1.5"),
                 ("store bytes / source bytes", f"{r['store_over_source']:.3f}", "")]
    if "loader" in results:
        r = results["loader"]
        rows += [("loader: cached / on the fly", f"{r['speedup']:.1f}x",
                  f"{r['cached_volumes_per_s']:.2f} vs {r['onthefly_volumes_per_s']:.3f} volumes/s, "
                  f"{r['workers']} workers, {r['device']}"),
                 ("loader: cached without augmentation / on the fly", f"{r['speedup_noaug']:.1f}x", ""),
                 ("store read per core (uint8 delivered)", f"{r['store_read_mb_per_s']:.0f} MB/s", "target >= 300")]
        if r.get("monai_persistent_volumes_per_s"):
            rows.append(("loader: cached / MONAI PersistentDataset, CacheDataset",
                         f"{r['cached_volumes_per_s'] / r['monai_persistent_volumes_per_s']:.2f}x, "
                         f"{r['cached_volumes_per_s'] / r['monai_cache_volumes_per_s']:.2f}x",
                         f"{r['monai_persistent_volumes_per_s']:.1f}, {r['monai_cache_volumes_per_s']:.1f} volumes/s"))
    if "augment" in results:
        r = results["augment"]
        for name, s in r["sets"].items():
            mix = s["volumes_per_s"]["config mix"]
            dev, cpu = mix[f"device_{r['device']}"], mix["albumentations_cpu"]
            rows.append((f"augment {name}: DeviceAugment / albumentations", f"{dev / cpu:.2f}x",
                         f"{dev:.1f} vs {cpu:.1f} volumes/s ({r['device']})"))
    if "train_step" in results:
        for name, t in results["train_step"]["runs"].items():
            rows.append((f"train {name}", f"{t['slices_per_s']:.1f} slices/s",
                         f"data wait {100 * t['data_wait_frac']:.1f} %, {t['step_ms']:.0f} ms/step"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    args = p.parse_args(argv)
    results, seconds = {}, {}
    for name in args.only:
        results[name], seconds[name] = run_script(name, args)
    summary = {"quick": args.quick, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "total_seconds": round(sum(seconds.values()), 1), "headline": summarise(results),
               "machine": common.machine_info()}
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    rows = [*summary["headline"], ("wall time, all benchmarks", f"{summary['total_seconds']:.0f} s", walls)]
    common.emit("summary", summary, args, rows, ("measurement", "value", "detail"), "benchmark summary")
    return summary


if __name__ == "__main__":
    main()
