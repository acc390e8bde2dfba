"""Smoke test of the benchmarks: each script's smallest mode runs end to end and keeps its output
contract (with --json the LAST stdout line is the JSON object, also written to <out>/<name>.json).

Small generated volumes (`--scale small`), one volume, a step or two: numbers are not checked,
only that every key a reader (run_all, BENCHMARKS.md, the issue's check) relies on is there and sane.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cttrain.config import load_config

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
DEMO = load_config(REPO / "configs" / "demo.yaml")

LOADER_KEYS = {"cached_volumes_per_s", "onthefly_volumes_per_s", "speedup", "workers", "shape"}
BUILD_KEYS = {"decode_s", "build_w1_s", "build_w2_s", "noop_s", "build_over_decode", "store_bytes",
              "source_bytes", "store_over_source", "stages_s", "write_s"}


def run_bench(name: str, tmp: Path, *extra: str) -> dict:
    out = tmp / "results"
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--json", "--out", str(out),
           "--data", str(tmp / "data"), "--device", "cpu", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
    last = proc.stdout.rstrip("\n").splitlines()[-1]
    result = json.loads(last)
    assert json.loads((out / f"{name}.json").read_text(encoding="utf-8")) == result
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def results() -> dict:
    return {}


def test_build_cache(work: Path, results: dict) -> None:
    r = run_bench("build_cache", work, "--scale", "small", "--volumes", "1", "--repeats", "1",
                  "--config", str(REPO / "configs" / "demo.yaml"))
    assert set(r) >= BUILD_KEYS
    assert r["volumes"] == 1 and r["data"]["scale"] == "small"
    assert r["build_over_decode"] == pytest.approx(r["build_w1_s"] / r["decode_s"], rel=0.01)
    assert r["store_bytes"] > 0 and r["source_bytes"] > 0
    assert "read" in r["stages_s"]
    results["build_cache"] = r


def test_loader(work: Path, results: dict) -> None:
    r = run_bench("loader", work, "--scale", "small", "--volumes", "1", "--epochs", "1", "--workers", "0",
                  "--batch-size", "1", "--config", str(REPO / "configs" / "demo.yaml"))
    assert set(r) >= LOADER_KEYS
    assert r["workers"] == 0
    assert r["shape"] == [DEMO.data.slices, len(DEMO.preprocess.windows), *DEMO.preprocess.shape[1:]]
    assert r["onthefly"]["shape"] == r["cached"]["shape"] == r["shape"]
    assert r["speedup"] == pytest.approx(r["cached_volumes_per_s"] / r["onthefly_volumes_per_s"], rel=0.01)
    assert r["cached_volumes_per_s"] > 0 and r["onthefly_volumes_per_s"] > 0
    assert {"read", "clahe", "albumentations"} <= set(r["stages"]["onthefly_ms"])
    assert {"store_read", "device_augment"} <= set(r["stages"]["cached_ms"])
    crc = r["checksum"]                                   # the read-speed cost of the chunk checksums
    assert crc["with_crc32c_ms"] > 0 and crc["without_ms"] > 0
    assert crc["cost_pct"] == pytest.approx(100 * (crc["with_crc32c_ms"] / crc["without_ms"] - 1), abs=1.0)
    read = r["stages"]["read"]                            # the direct shard read beside zarr's own path
    assert read["direct_ms"] > 0 and read["zarr_ms"] > 0 and r["store_read_mb_per_s"] == read["delivered_mb_per_s"]
    assert read["decoded_mb_per_s"] >= read["delivered_mb_per_s"]
    # the peer, in the same run, on the same volumes and target shape (the bench extra is in dev)
    assert r["monai_persistent_volumes_per_s"] > 0 and r["monai_cache_volumes_per_s"] > 0
    assert r["monai_first_epoch_s"] > 0 and r["monai"]["shape"] == r["shape"]
    assert r["monai"]["persistent"]["disk_bytes_per_volume"] > 0 and r["monai"]["cache"]["ram_bytes_per_volume"] > 0
    results["loader"] = r


def test_anatomy_scale_volumes_are_real_thorax_at_256(tmp_path: Path, realct: Path) -> None:
    """`--scale anatomy`: the build bench's real-anatomy-size input (issue 9), made from the real scan."""
    import SimpleITK as sitk

    sys.path.insert(0, str(BENCH))
    try:
        import bench_data
    finally:
        sys.path.remove(str(BENCH))
    data = bench_data.ensure_data(tmp_path, 2, 0, "anatomy")
    assert data.generator == "realct.chest_ct_dicom" and len(data.files) == 2 and data.metadata_csv is None
    for path in data.files:
        image = sitk.ReadImage(str(path))
        assert image.GetSize()[:2] == (256, 256) and 110 <= image.GetSize()[2] <= 141
        hu = sitk.GetArrayViewFromImage(image)
        assert hu.min() <= -1000 and hu.max() > 500                     # air and bone: real anatomy
    again = bench_data.ensure_data(tmp_path, 2, 0, "anatomy")            # generated once, then reused
    assert again.files == data.files


def test_augment(work: Path, results: dict) -> None:
    r = run_bench("augment", work, "--sets", "demo", "--seconds", "0.01")
    rows = r["sets"]["demo"]["volumes_per_s"]
    alone = {f"{t} alone" for t in ("affine", "elastic", "blur", "intensity", "noise")}
    assert set(rows) == {"config mix", *alone}
    assert all(v["albumentations_cpu"] > 0 and v["device_cpu"] > 0 and v["kornia_cpu"] > 0 for v in rows.values())
    assert r["sets"]["demo"]["shape"][1:] == [DEMO.data.slices, len(DEMO.preprocess.windows),
                                              *DEMO.preprocess.shape[1:]]
    results["augment"] = r


def test_train_step(work: Path, results: dict) -> None:
    r = run_bench("train_step", work, "--scale", "small", "--volumes", "1", "--steps", "2",
                  "--set", "data.batch_size=2", "--threads", "1")
    run = r["runs"]["demo_cpu"]
    assert run["steps"] == 2 and run["volumes"] == 4
    assert run["skipped_steps"] == DEMO.data.num_workers * DEMO.data.prefetch and run["startup_s"] > 0
    assert run["slices_per_s"] > 0 and 0 <= run["data_wait_frac"] <= 1
    assert run["deterministic"] is True and run["cudnn_benchmark"] is False  # the mode it ran in
    assert run["backbone"] == "tiny" and run["device"] == "cpu"
    assert "default_cuda_compile_off" not in r["runs"]  # --device cpu: the GPU path is skipped
    results["train_step"] = r


def test_train_step_times_steady_state_steps_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loader that takes 1 s to start is reported as start-up, not charged to the timed steps."""
    from test_engine import make_store, tiny_cfg

    import cttrain.data

    sys.path.insert(0, str(BENCH))
    try:
        import train_step
    finally:
        sys.path.remove(str(BENCH))

    class SlowStart:
        def __init__(self, loader: object) -> None:
            self.loader = loader

        def __len__(self) -> int:
            return len(self.loader)

        def __iter__(self) -> object:
            time.sleep(1.0)  # forking workers, opening the store, the first reads
            return iter(self.loader)

    real = cttrain.data.make_loader
    monkeypatch.setattr(cttrain.data, "make_loader", lambda *a, **kw: SlowStart(real(*a, **kw)))
    store = make_store(tmp_path / "tiny.zarr")
    r = train_step.run(tiny_cfg(store), store, steps=2, warmup_steps=1, skip=1)
    assert r["startup_s"] >= 1.0 and r["seconds"] < 1.0
    assert r["steps"] == 2 and r["volumes"] == 8 and r["skipped_steps"] == 1
    # r["seconds"] is rounded to 1 ms, which alone moves the rate by up to 0.5 ms / seconds
    assert r["slices_per_s"] == pytest.approx(8 * 4 / r["seconds"], rel=0.01 + 0.0005 / r["seconds"])
    assert 0 <= r["data_wait_frac"] < 1


def test_run_all_summary(results: dict) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCH))
    if set(results) != set(run_all.SCRIPTS):
        pytest.skip("needs the results of the four benchmark tests above")
    names = [row[0] for row in run_all.summarise(results)]
    assert "loader: cached / on the fly" in names
    assert "build-cache -j1 / bare decode" in names
    assert any(n.startswith("train demo_cpu") for n in names)
