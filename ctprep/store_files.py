"""What lives around a store rather than in it: the creation lock, side files, its size on disk and
the temporary files a killed writer leaves. Local paths and fsspec URLs alike (`ctprep.remote`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ctprep import remote

SIDE_FILES = ("failures", "folds")


@contextlib.contextmanager
def creation_lock(path: str | Path) -> Iterator[None]:
    """Serialise store creation/validation between processes on one filesystem.

    Remote stores (fsspec URLs) take no lock: their creation is safe without one
    (`ctprep.remote_store`)."""
    if remote.is_remote(path):
        yield
        return
    lock_path = Path(str(path).rstrip("/") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def side_file(path: str | Path, kind: str, shard: tuple[int, int] = (0, 1)) -> remote.Target:
    """Where a store's side file lives: `<store>.<kind>.json` beside the store (`ctrate.zarr` ->
    `ctrate.zarr.failures.json`, `ctrate.zarr.folds.json`), so two stores in one folder never share
    a report. A shard I/N (N > 1) of build-cache writes `<store>.failures.shard-I-of-N.json`, so
    concurrent shards never overwrite each other's. A local store's side files are Paths; a remote
    store's are URLs beside it on the same storage (`s3://b/p/ctrate.zarr.failures.json`), so the
    shards of a job array on many machines write their reports where one `ctprep info` finds them."""
    if kind not in SIDE_FILES:
        raise ValueError(f"unknown side file {kind!r}; choose one of {', '.join(SIDE_FILES)}")
    text = str(path).rstrip("/")
    i, n = shard
    suffix = f".{kind}.json" if n == 1 else f".{kind}.shard-{i}-of-{n}.json"
    if remote.is_remote(text):
        return text + suffix
    base = Path(text)
    return base.with_name(base.name + suffix)


def store_bytes(path: str | Path) -> int | None:
    """Bytes of a store (on disk, or of its objects under a URL); None for a missing local path."""
    if remote.is_remote(path):
        from ctprep.remote_store import total_bytes

        return total_bytes(str(path))
    if not Path(path).is_dir():
        return None
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def clean_stale_temp_files(path: str | Path) -> int:
    """Remove temporary chunk files a killed writer left behind (zarr's LocalStore writes
    `<chunk>.<uuid>.partial` and renames it into place). Object stores have none."""
    if remote.is_remote(path):
        return 0
    removed = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, name))
                    removed += 1
    return removed
