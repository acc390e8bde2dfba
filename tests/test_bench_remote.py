"""Smoke test of bench/remote.py (the remote store's read path on the local moto S3 server): its
smallest mode runs end to end and keeps the keys BENCHMARKS.md §6 reads; numbers are not checked."""

from __future__ import annotations

import pytest
from test_bench import REPO, run_bench

pytest.importorskip("s3fs")
pytest.importorskip("moto")


def test_remote_bench_smoke(tmp_path):
    r = run_bench("remote", tmp_path, "--scale", "small", "--volumes", "2", "--passes", "1", "--workers", "0",
                  "--read-ahead", "2", "--latency-ms", "5", "--config", str(REPO / "configs" / "demo.yaml"))
    assert r["rows"] == 2 and r["store_bytes"] > 0 and r["server"].startswith("moto")
    assert r["read_ms"]["local"] > 0 and r["read_ms"]["remote"] > 0
    assert set(r["batch_ms"]) == {"one_after_another_ms", "read_many_ms"}
    runs = [r["loader_local"], r["loader_remote_serial"], r["loader_remote"], r["with_latency"]["serial"],
            r["with_latency"]["ahead"]]
    assert {x["volumes"] for x in runs} == {2} and [x["read_ahead"] for x in runs] == [1, 1, 2, 1, 2]
