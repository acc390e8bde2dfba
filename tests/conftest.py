"""Shared test fixtures. Real CT scans live in ../shared/realct beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores are shared by the suite: keep BLAS/OpenMP pools from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
REALCT = REPO.parent / "shared" / "realct"


@pytest.fixture(scope="session")
def realct() -> Path:
    if not REALCT.is_dir():
        pytest.skip(f"real CT samples not found at {REALCT}")
    return REALCT


# ---------------------------------------------------------------------- a local S3 server (moto)


@pytest.fixture(autouse=True)
def _no_inherited_storage_options(monkeypatch):
    """Each test starts without the storage options an earlier in-process command configured
    (`ctprep.remote.configure` sets an environment variable for the processes it starts)."""
    monkeypatch.setenv("CTPREP_STORAGE_OPTIONS", "")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 in its own process, with credentials checked (one IAM user),
    one bucket, and this session's AWS_* variables pointing at it (subprocesses inherit them).
    Yields an object with endpoint, key, secret, bucket and url(name)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from s3server import start_s3

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with pytest.MonkeyPatch.context() as mp, start_s3(log) as server:
        for name, value in server.env().items():
            mp.setenv(name, value)
        yield server
