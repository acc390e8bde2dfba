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
