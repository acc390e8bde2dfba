"""The store on object storage: creation without locks, and the few reads that differ from local.

A job array (`build-cache --shard I/N` on many machines) shares no filesystem lock, so creation is
made safe by three facts instead:

- The store's creation bytes are a pure function of its inputs (rows, labels, preprocess config):
  the group and array metadata and the `labels` chunk (the other arrays start empty). So
  `create_remote` builds them in a local temporary directory with the very code of a local store
  (`ctprep.store.create_store`) and uploads them, the group's `zarr.json` last. Two shards that
  race upload identical bytes, nothing is ever deleted, and a store is visible (its root
  `zarr.json` present) only once complete. A creator killed half-way is finished by the next one.
- The first creator claims the store with an exclusive PUT (`If-None-Match: *`, supported by AWS S3,
  MinIO, moto) of `ctprep-creator.json` holding a hash of its inputs; a shard started with other
  inputs (another labels CSV or config) finds a different hash and is refused before it uploads
  anything. Where the server ignores the condition the claim is read back, a best effort; there,
  `build-cache --create-only` once before the array is the safe way.
- Every writer then touches only objects of its own rows: one `images` shard per row (written
  whole: a partial-shard write is a read-modify-write, which loses data under concurrency), and
  one object per row in `written`, `source` and `row_info` (chunks of one element). An object PUT
  is atomic: a `kill -9` leaves the old object or the new one, never half of it.

Reading `written` row by row would be one request per row (50k for CT-RATE); its objects are
listed instead: a flag object exists exactly when the row is written, because setting a flag to
False deletes it (the fill value is False and empty chunks are not stored).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctprep import remote

CLAIM = "ctprep-creator.json"


def inputs_hash(volume_names: list[str], labels: np.ndarray, label_names: list[str], fingerprint: str) -> str:
    """What makes two creators' stores identical: rows, labels, label columns, preprocess fingerprint."""
    h = hashlib.sha256()
    h.update(json.dumps([list(volume_names), list(label_names), fingerprint]).encode())
    h.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    return h.hexdigest()[:24]


def state(url: str) -> str:
    """'store' (its root zarr.json is there), 'creating' (a claim but no root yet: a creator is at
    work or was killed), 'absent' (nothing under the prefix) or 'other' (objects, but no store).

    The prefix is listed BEFORE the claim is looked for: a creator PUTs its claim before any other
    object, so whatever the listing saw implies a claim by the time it is checked. Checking the
    claim first and listing after would call a store that another shard starts creating in between
    'other' (seen once in CI: two shards racing to create one store)."""
    fs, root = remote.filesystem(url)
    try:
        fs.invalidate_cache()
        if fs.exists(remote.join(root, "zarr.json")):
            return "store"
        try:
            # A listing, not a bucket probe: a key with access to one prefix may not probe buckets.
            listed = bool(fs.ls(root, detail=False))
        except FileNotFoundError as exc:
            if any(w in str(exc).lower() for w in ("bucket does not exist", "nosuchbucket")):
                raise
            listed = False
        if not listed:
            return "absent"
        fs.invalidate_cache()
        if fs.exists(remote.join(root, "zarr.json")):
            return "store"
        return "creating" if fs.exists(remote.join(root, CLAIM)) else "other"
    except Exception as exc:  # noqa: BLE001 - one line naming the URL
        raise remote.store_error(url, exc) from None


def _claim(url: str, digest: str) -> None:
    """Claim the store for creation, or accept the claim of a creator with the same inputs."""
    from ctprep.store import StoreError

    fs, root = remote.filesystem(url)
    path = remote.join(root, CLAIM)
    body = json.dumps({"inputs": digest, "by": f"{socket.gethostname()}:{os.getpid()}",
                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
    try:
        try:
            with fs.open(path, "xb") as fh:     # exclusive: fails when another creator was first
                fh.write(body)
        except (ValueError, NotImplementedError):
            fs.pipe_file(path, body)            # no exclusive create on this filesystem: best effort
    except FileExistsError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise remote.store_error(url, exc) from None
    try:
        other = json.loads(fs.cat_file(path))
    except Exception as exc:  # noqa: BLE001
        raise remote.store_error(url, exc) from None
    if other.get("inputs") != digest:
        raise StoreError(f"{url}: another build-cache ({other.get('by', '?')}, {other.get('at', '?')}) is creating "
                         "this store from other inputs (labels CSV, metadata or preprocess config); start every "
                         "shard with the same inputs, or delete the store and start again")


def create_remote(url: str, **kwargs: Any) -> None:
    """Create the store at `url` (see the module doc): claim, upload, root `zarr.json` last."""
    from ctprep.store import create_store, fingerprint

    digest = inputs_hash(list(kwargs["volume_names"]), kwargs["labels"], list(kwargs["label_names"]),
                         fingerprint(kwargs["cfg"]))
    _claim(url, digest)
    fs, root = remote.filesystem(url)
    with tempfile.TemporaryDirectory(prefix="ctprep-create-") as tmp:
        local = Path(tmp) / "store.zarr"
        create_store(local, **kwargs)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        top = local / "zarr.json"
        try:
            for path in [p for p in files if p != top] + [top]:
                fs.pipe_file(remote.join(root, path.relative_to(local).as_posix()), path.read_bytes())
        except Exception as exc:  # noqa: BLE001
            raise remote.store_error(url, exc) from None


def written_rows(url: str, array: Any, n: int) -> np.ndarray:
    """`written` flags from one listing of the flag objects (see the module doc)."""
    fs, root = remote.filesystem(url)
    prefix = remote.join(root, "written")
    keys = {array.metadata.encode_chunk_key((i,)): i for i in range(n)}
    out = np.zeros(n, dtype=bool)
    try:
        fs.invalidate_cache()
        found = fs.find(prefix) if fs.exists(prefix) else []
    except Exception as exc:  # noqa: BLE001
        raise remote.store_error(url, exc) from None
    for path in found:
        row = keys.get(path[len(prefix) + 1:])
        if row is not None:
            out[row] = True
    return out


def object_bytes(url: str, key: str) -> bytes | None:
    """The bytes of one object of the store (None when it does not exist)."""
    fs, root = remote.filesystem(url)
    try:
        return fs.cat_file(remote.join(root, key))
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001
        raise remote.store_error(url, exc) from None


def object_exists(url: str, key: str) -> bool:
    fs, root = remote.filesystem(url)
    try:
        with contextlib.suppress(Exception):
            fs.invalidate_cache(remote.join(root, key))
        return bool(fs.exists(remote.join(root, key)))
    except Exception as exc:  # noqa: BLE001
        raise remote.store_error(url, exc) from None


def total_bytes(url: str) -> int | None:
    """Bytes of every object under the store's prefix (one listing), None when it cannot be listed."""
    fs, root = remote.filesystem(url)
    try:
        fs.invalidate_cache()
        return int(fs.du(root))
    except Exception:  # noqa: BLE001 - a size is informative only
        return None
