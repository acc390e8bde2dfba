"""Shared pieces of the benchmarks: arguments, thread limits, machine description, stores (built
once into a cache directory and reused), result output. The generated volumes: `bench_data`.

Every benchmark prints a rich table, writes `<out>/<name>.json`, and with `--json` prints the same
object as the LAST line of stdout, so a script can read it with `stdout.splitlines()[-1]`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repository
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "results"
REALCT = REPO.parent / "shared" / "realct"
DEFAULT_DATA = REPO / "bench" / ".data"
PYTHON = sys.executable

if TYPE_CHECKING:
    from bench_data import BenchData


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


# ---------------------------------------------------------------------------------------- stores


def console_command(name: str) -> list[str]:
    """The `name` console script (ctprep, cttrain) beside this interpreter, else `python -m name`."""
    script = Path(PYTHON).with_name(name)
    return [str(script)] if script.is_file() else [PYTHON, "-m", name]


def ctprep_command() -> list[str]:
    return console_command("ctprep")


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
