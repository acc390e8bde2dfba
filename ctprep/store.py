"""The ctprep store: one zarr v3 group, the contract between ctprep and cttrain.

| node       | kind                           | meaning                                              |
|------------|--------------------------------|------------------------------------------------------|
| `images`   | uint8 (N, D, C, H, W)          | chunks of `chunk_slices` slices, one shard per volume |
| `labels`   | uint8 (N, L)                   | 0/1 per label (one chunk: written once, at creation)  |
| `folds`    | int8 (N,)                      | fold index, -1 before `make-folds`                    |
| `written`  | bool (N,)                      | row finished and verified, one chunk per row          |
| `source`   | str (N,)                       | source fingerprint of the row's file (resume check)   |
| `row_info` | str (N,)                       | JSON per row: HU rule applied, geometry, QC flags     |

Every chunk of every array ends in a crc32c checksum (zarr v3's `crc32c` codec; cache version 2),
so damage is found when read: `ctprep verify` scans the written rows, the training reader names the
row and volume. Stores of cache version 1 have no chunk checksums; they still read, `verify`
says so, and build-cache refuses to extend them (rebuild with `--overwrite`).

Group attrs: `schema`, `volume_names`, `patient_ids`, `label_names`, `windows`, `preprocess`,
`fingerprint` (DESIGN.md), plus `cache_version` and `layout`.

Why this layout: every array a worker writes has one chunk per row, so parallel writers (`--workers`,
`--shard I/N`) never write the same chunk file, and zarr's LocalStore writes each chunk file
atomically (temporary file + rename): a `kill -9` leaves either the old or the new chunk. A row is
marked `written` only after its images were read back and checked (the shard's bytes against their
checksums), so an interrupted row is simply redone. Group attrs are written only at creation (under
a lock) and by `make-folds`.

The same holds on object storage (any fsspec URL, `ctprep.remote`): there every chunk is one
object and a PUT is atomic; creation without a lock is `ctprep.remote_store`'s protocol.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctprep import CACHE_VERSION, remote
from ctprep.config import PreprocessConfig, to_dict
from ctprep.store_files import (  # noqa: F401 - re-exported: the store's own helpers, one import away
    SIDE_FILES,
    clean_stale_temp_files,
    creation_lock,
    side_file,
    store_bytes,
)

SCHEMA = "ctprep-cache/1"


class StoreError(Exception):
    """A store problem a user can act on; the message names the store and the reason."""


def fingerprint(cfg: PreprocessConfig) -> str:
    """Hash of the preprocess config plus the code's cache version (changes => rebuild)."""
    payload = json.dumps({"preprocess": to_dict(cfg), "cache_version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "preprocess") -> list[str]:
    """Keys whose values differ between two preprocess dicts, as `preprocess.key: old -> new`."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{prefix}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def chunk_depth(depth: int, chunk_slices: int) -> int:
    """Largest divisor of `depth` not above `chunk_slices` (a shard must hold whole chunks)."""
    for k in range(min(chunk_slices, depth), 0, -1):
        if depth % k == 0:
            return k
    return 1


def _compressors(cfg: PreprocessConfig) -> list[Any]:
    """The images' bytes-to-bytes codecs: the configured compressor, then a crc32c checksum.

    The checksum is the last codec, so it covers the compressed bytes on disk: a flipped or
    truncated chunk fails its check when read (`ctprep verify`, training) instead of decoding to
    garbage. Inside a shard each chunk carries its own checksum, and zarr's shard index has one
    by default, so damage is pinned to a few slices of one volume."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if cfg.compressor == "none":
        return [Crc32cCodec()]
    if cfg.compressor == "zstd":
        return [ZstdCodec(level=cfg.compression_level), Crc32cCodec()]
    cname = cfg.compressor.split("-", 1)[1]
    # uint8 pixels: byte shuffle is a no-op, bit shuffle measurably hurts speed for little gain.
    return [BloscCodec(cname=cname, clevel=cfg.compression_level, shuffle="noshuffle"), Crc32cCodec()]


def _small_codecs() -> list[Any]:
    """The per-row arrays (labels, folds, written, source, row_info): zarr's default zstd plus crc32c."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0), Crc32cCodec()]


def has_checksums(array: Any) -> bool:
    """True when the array's chunks (inside its shards, if sharded) end in a crc32c codec."""
    from zarr.codecs import Crc32cCodec, ShardingCodec

    codecs = list(array.metadata.codecs)
    inner = [c for codec in codecs if isinstance(codec, ShardingCodec) for c in codec.codecs]
    return any(isinstance(c, Crc32cCodec) for c in inner or codecs)


def _is_local(path: str | Path) -> bool:
    return not remote.is_remote(path)


def store_exists(path: str | Path) -> bool:
    """Whether a store's root is there; a remote store that cannot be reached raises StoreError."""
    if _is_local(path):
        return (Path(path) / "zarr.json").exists()
    from ctprep.remote_store import state

    return state(str(path)) == "store"


def create_store(path: str | Path, *, volume_names: Sequence[str], patient_ids: Sequence[str],
                 labels: np.ndarray, label_names: Sequence[str], cfg: PreprocessConfig,
                 overwrite: bool = False) -> CacheStore:
    """Create the group with every row (unwritten) from the input list."""
    import zarr

    n = len(volume_names)
    if n == 0:
        raise StoreError(f"{path}: no volumes to store")
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.shape != (n, len(label_names)):
        raise StoreError(f"{path}: labels shape {labels.shape} != ({n}, {len(label_names)})")
    d, h, w = cfg.shape
    c = len(cfg.windows)
    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    group.create_array(
        "images", shape=(n, d, c, h, w), dtype="uint8",
        chunks=(1, chunk_depth(d, cfg.chunk_slices), c, h, w), shards=(1, d, c, h, w),
        compressors=_compressors(cfg), fill_value=0, dimension_names=("volume", "slice", "window", "y", "x"),
    )
    # Labels are written once, here, so one chunk: opening a 50k-row store reads one file, not 50k.
    small = _small_codecs()
    group.create_array("labels", shape=(n, len(label_names)), dtype="uint8", chunks=(n, len(label_names)),
                       fill_value=0, compressors=small)[:] = labels
    group.create_array("folds", shape=(n,), dtype="int8", chunks=(n,), fill_value=-1, compressors=small)
    group.create_array("written", shape=(n,), dtype="bool", chunks=(1,), fill_value=False, compressors=small)
    group.create_array("source", shape=(n,), dtype=str, chunks=(1,), fill_value="", compressors=small)
    group.create_array("row_info", shape=(n,), dtype=str, chunks=(1,), fill_value="", compressors=small)
    group.attrs.update({
        "schema": SCHEMA,
        "volume_names": list(volume_names),
        "patient_ids": list(patient_ids),
        "label_names": list(label_names),
        "windows": [to_dict(win) for win in cfg.windows],
        "preprocess": to_dict(cfg),
        "fingerprint": fingerprint(cfg),
        "cache_version": CACHE_VERSION,
        "layout": "images (volume, slice, window, y, x); row i of every array is volume_names[i]",
    })
    return CacheStore(path, mode="r+")


@dataclass
class RowState:
    written: bool
    source: str


class CacheStore:
    """Thin handle on an existing store. Arrays are opened lazily, so a handle is cheap to create
    in each worker process."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        import zarr

        self.path = path
        self.mode = mode
        self.remote = remote.is_remote(path)
        extra = {"storage_options": remote.storage_options()} if self.remote else {}
        try:
            self.group = zarr.open_group(str(path), mode=mode, zarr_format=3, **extra)
        except FileNotFoundError:
            if self.remote:
                from ctprep.remote_store import state

                state(str(path))  # raises the one line for a missing bucket or denied access
            raise StoreError(f"{path}: no ctprep store here (run `ctprep build-cache` first)") from None
        except Exception as exc:  # noqa: BLE001 - zarr raises several types for a non-store path
            if self.remote:
                raise remote.store_error(path, exc) from None
            raise StoreError(f"{path}: not a readable zarr v3 store ({type(exc).__name__}: {exc})") from None
        self.attrs = dict(self.group.attrs)
        schema = self.attrs.get("schema")
        if schema != SCHEMA:
            raise StoreError(f"{path}: schema {schema!r} is not {SCHEMA!r} (not a ctprep store, or another version)")
        self._arrays: dict[str, Any] = {}

    def array(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _images_for_write(self) -> Any:
        """`images` writing every chunk, even one equal to the fill value: then a written row always
        has its shard file, and a missing one is damage (`verify`), not an all-black volume."""
        if "images:write" not in self._arrays:
            self._arrays["images:write"] = self.array("images").with_config({"write_empty_chunks": True})
        return self._arrays["images:write"]

    @property
    def checksums(self) -> bool:
        """Whether the images' chunks carry crc32c checksums (cache version >= 2)."""
        return has_checksums(self.array("images"))

    def shard_key(self, row: int) -> str:
        """The key of row `row`'s images shard inside the store (`images/c/<row>/0/0/0/0`)."""
        arr = self.array("images")
        return "images/" + arr.metadata.encode_chunk_key((row,) + (0,) * (arr.ndim - 1))

    def shard_file(self, row: int) -> Path | None:
        """The file holding row `row`'s images (None for remote stores)."""
        if self.remote:
            return None
        return Path(self.path) / self.shard_key(row)

    def shard_bytes(self, row: int) -> bytes | None:
        """The encoded bytes of row `row`'s images shard (None when it does not exist)."""
        if self.remote:
            from ctprep.remote_store import object_bytes

            return object_bytes(str(self.path), self.shard_key(row))
        try:
            return Path(self.path, self.shard_key(row)).read_bytes()
        except FileNotFoundError:
            return None

    def shard_exists(self, row: int) -> bool:
        if self.remote:
            from ctprep.remote_store import object_exists

            return object_exists(str(self.path), self.shard_key(row))
        return Path(self.path, self.shard_key(row)).is_file()

    # ---- attributes -------------------------------------------------------------------------
    @property
    def volume_names(self) -> list[str]:
        return list(self.attrs["volume_names"])

    @property
    def patient_ids(self) -> list[str]:
        return list(self.attrs["patient_ids"])

    @property
    def label_names(self) -> list[str]:
        return list(self.attrs["label_names"])

    @property
    def windows(self) -> list[dict[str, Any]]:
        return list(self.attrs["windows"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.attrs["preprocess"])

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    @property
    def n(self) -> int:
        return len(self.attrs["volume_names"])

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        """(D, C, H, W) of one volume."""
        return tuple(self.array("images").shape[1:])  # type: ignore[return-value]

    # ---- whole-array reads -------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        return np.asarray(self.array("labels")[:], dtype=np.uint8)

    def folds(self) -> np.ndarray:
        return np.asarray(self.array("folds")[:], dtype=np.int8)

    def written(self) -> np.ndarray:
        """Written flags; a flag chunk that cannot be decoded (torn by a crash) counts as False.
        A remote store's flags come from one listing (`remote_store.written_rows`)."""
        arr = self.array("written")
        if self.remote:
            from ctprep.remote_store import written_rows

            return written_rows(str(self.path), arr, self.n)
        try:
            return np.asarray(arr[:], dtype=bool)
        except Exception:  # noqa: BLE001 - fall back to row by row to isolate a damaged chunk
            out = np.zeros(self.n, dtype=bool)
            for i in range(self.n):
                with contextlib.suppress(Exception):
                    out[i] = bool(arr[i])
            return out

    def sources(self, rows: Sequence[int] | None = None) -> list[str]:
        """Source fingerprints of all rows, or of `rows` only (a remote shard reads just its own)."""
        arr = self.array("source")
        values = arr[:] if rows is None else (arr.get_coordinate_selection(np.asarray(rows)) if len(rows) else [])
        return [str(s) for s in values]

    def row_info(self, row: int) -> dict[str, Any]:
        text = str(self.array("row_info")[row])
        return json.loads(text) if text else {}

    def all_row_info(self, rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Row infos of all rows, or of `rows` only."""
        arr = self.array("row_info")
        values = arr[:] if rows is None else (arr.get_coordinate_selection(np.asarray(rows)) if len(rows) else [])
        return [json.loads(str(t)) if str(t) else {} for t in values]

    # ---- per-row access ----------------------------------------------------------------------
    def read_images(self, row: int, slices: Any = slice(None), channels: Any = slice(None)) -> np.ndarray:
        """uint8 (K, C, H, W) for one volume; only the chunks holding `slices` are decoded."""
        arr = self.array("images")
        if isinstance(slices, slice) and isinstance(channels, slice):
            return np.asarray(arr[row, slices, channels])
        return np.asarray(arr.oindex[row, slices, channels])

    def write_row(self, row: int, images: np.ndarray, source: str, info: dict[str, Any]) -> None:
        """Write one volume, read it back to verify, then flag it written (in that order)."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        expected = self.image_shape
        if images.shape != expected:
            raise StoreError(f"{self.path}: row {row} images shape {images.shape} != store {expected}")
        self.array("written")[row] = False
        self._images_for_write()[row] = images
        self._check_written(row, images)
        self.array("source")[row] = source
        self.array("row_info")[row] = json.dumps(info, sort_keys=True)
        self.array("written")[row] = True

    def _check_written(self, row: int, images: np.ndarray) -> None:
        """Read the row back before it is flagged: the shard's bytes against their crc32c checksums
        (what zarr encoded is what is on disk or in the bucket; one read, no decompression); stores
        without checksums decode the row and compare it with what was written."""
        from ctprep.verify import shard_bytes_problem

        if self.checksums:
            arr = self.array("images")
            try:
                per_shard = int(np.prod([s // c for s, c in zip(arr.shards, arr.chunks, strict=True)]))
                raw = self.shard_bytes(row)
                problem = "its shard is missing" if raw is None else shard_bytes_problem(raw, per_shard)
            except OSError as exc:
                problem = f"cannot read its shard back ({exc.strerror or exc})"
            if problem:
                raise StoreError(f"{self.path}: row {row} read back: {problem}")
            return
        if not np.array_equal(np.asarray(self.array("images")[row]), images):
            raise StoreError(f"{self.path}: row {row} read back differs from what was written")

    def write_folds(self, folds: np.ndarray, meta: dict[str, Any]) -> None:
        folds = np.asarray(folds, dtype=np.int8)
        if folds.shape != (self.n,):
            raise StoreError(f"{self.path}: folds shape {folds.shape} != ({self.n},)")
        self.array("folds")[:] = folds
        self.group.attrs["folds"] = meta
        self.attrs["folds"] = meta


def read_error_reason(exc: BaseException) -> str:
    """One line for a failed chunk read: a checksum mismatch says so, anything else (a codec or
    shard-index error on truncated bytes) is named by type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "checksum do not match" in text:
        return "crc32c checksum mismatch: the bytes on disk changed since they were written"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def open_store(path: str | Path, mode: str = "r") -> CacheStore:
    return CacheStore(path, mode=mode)
