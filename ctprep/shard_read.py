"""Direct reads of the store's image shards: one file read, then the codec, nothing else.

The bytes are zarr v3's own format, written by zarr (`ctprep.store`); only the read side is ours,
because zarr 3.1 spends most of a training read outside the codec (measured on a CT-RATE-size
demo store, one thread: 5.5 ms per 20-slice window through `arr[row, lo:hi]` against 1.7 ms for
decoding the same chunks here; BENCHMARKS.md §1). A shard of `images` (one volume) is laid out as

    chunk 0 | chunk 1 | ... | index: (chunks, 2) little-endian uint64 (offset, nbytes) | crc32c

with each chunk `zstd|blosc|raw(bytes) + crc32c(4 bytes)` and an absent chunk marked by
offset = nbytes = 2**64 - 1 (read as the fill value, 0, exactly as zarr does). `ShardLayout.of`
accepts only that codec chain (the one `ctprep.store.create_store` writes); any other layout
returns None and the caller reads through zarr, so a store written some other way still reads,
only slower. Checksums are checked as zarr checks them; a mismatch or a truncated shard raises
`ShardDamage` (the reader turns it into its one-line error naming row and volume).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

_ABSENT = 2**64 - 1


class ShardDamage(ValueError):
    """A shard whose bytes do not decode: checksum mismatch, truncation, bad index."""


@dataclass(frozen=True)
class ShardLayout:
    """What a direct read needs to know about `images`: chunk depth and codecs."""

    chunk_slices: int        # slices per chunk
    chunks: int              # chunks per shard (one shard = one volume)
    chunk_shape: tuple[int, ...]   # (chunk_slices, C, H, W)
    codec: str               # zstd | blosc | none
    checksum: bool           # each chunk ends in crc32c

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunk_shape))

    @property
    def index_nbytes(self) -> int:
        return 16 * self.chunks + 4

    @classmethod
    def of(cls, array: Any) -> ShardLayout | None:
        """The layout of a zarr `images` array, or None when it is not the one ctprep writes."""
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

        meta = array.metadata
        codecs = list(meta.codecs)
        if (len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or array.dtype != np.uint8
                or getattr(meta, "fill_value", 0) not in (0, None)):
            return None
        sharding = codecs[0]
        shard, inner = tuple(array.shards or ()), tuple(sharding.chunk_shape)
        if (shard != (1, *array.shape[1:]) or inner[0] != 1 or inner[2:] != tuple(array.shape[2:])
                or sharding.index_location.value != "end"):
            return None
        index = list(sharding.index_codecs)
        if not (len(index) == 2 and isinstance(index[0], BytesCodec) and isinstance(index[1], Crc32cCodec)
                and getattr(index[0].endian, "value", "little") == "little"):
            return None
        chain = list(sharding.codecs)
        if not chain or not isinstance(chain[0], BytesCodec):
            return None
        chain = chain[1:]
        checksum = bool(chain) and isinstance(chain[-1], Crc32cCodec)
        chain = chain[:-1] if checksum else chain
        if not chain:
            codec = "none"
        elif len(chain) == 1 and isinstance(chain[0], ZstdCodec):
            codec = "zstd"
        elif len(chain) == 1 and isinstance(chain[0], BloscCodec):
            codec = "blosc"
        else:
            return None
        depth = int(array.shape[1])
        return cls(chunk_slices=int(inner[1]), chunks=depth // int(inner[1]),
                   chunk_shape=tuple(int(s) for s in inner[1:]), codec=codec, checksum=checksum)


class ShardReader:
    """Decode chunk runs of shards laid out as `layout` (one instance per process: codecs hold state)."""

    def __init__(self, layout: ShardLayout) -> None:
        import google_crc32c
        import numcodecs

        self.layout = layout
        self._crc = google_crc32c.value
        self._codec = {"zstd": numcodecs.Zstd, "blosc": numcodecs.Blosc}.get(layout.codec, lambda: None)()

    def index(self, read: Any, size: int) -> np.ndarray:
        """(chunks, 2) uint64 (offset, nbytes) from the shard's last bytes; `read(offset, n)` -> bytes."""
        n = self.layout.index_nbytes
        if size < n:
            raise ShardDamage(f"shard of {size} bytes is shorter than its {n}-byte index (truncated)")
        raw = read(size - n, n)
        if self._crc(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ShardDamage("crc32c checksum mismatch in the shard index: the bytes on disk changed since "
                              "they were written (or the shard is truncated)")
        return np.frombuffer(raw, dtype="<u8", count=2 * self.layout.chunks).reshape(-1, 2)

    def decode(self, read: Any, size: int, index: np.ndarray, first: int, last: int, out: np.ndarray) -> None:
        """Chunks first..last (inclusive) into `out`, uint8 of shape ((last-first+1)*chunk_slices, C, H, W);
        `index` is `self.index(read, size)`, read once per shard.

        The chunks' bytes are fetched in one `read` (zarr writes a shard's chunks in order, so a
        run of chunks is one contiguous span of the file)."""
        idx = index[first:last + 1]
        present = idx[:, 0] != _ABSENT
        if not present.all():
            out[:] = 0
            if not present.any():
                return
        offs, lens = idx[present, 0].astype(np.int64), idx[present, 1].astype(np.int64)
        lo, hi = int(offs.min()), int((offs + lens).max())
        if hi > size - self.layout.index_nbytes:
            raise ShardDamage(f"chunk bytes end at {hi}, past the shard's data ({size} bytes with index): truncated")
        blob = read(lo, hi - lo)
        cs, nbytes = self.layout.chunk_slices, self.layout.chunk_nbytes
        for j in np.flatnonzero(present):
            off, length = int(idx[j, 0]) - lo, int(idx[j, 1])
            raw = blob[off:off + length]
            if self.layout.checksum:
                if length < 4 or self._crc(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    raise ShardDamage("crc32c checksum mismatch: the bytes on disk changed since they were written")
                raw = raw[:-4]
            target = out[j * cs:(j + 1) * cs]
            if self._codec is None:
                if len(raw) != nbytes:
                    raise ShardDamage(f"raw chunk of {len(raw)} bytes, expected {nbytes}")
                target.reshape(-1)[:] = np.frombuffer(raw, dtype=np.uint8)
                continue
            try:
                self._codec.decode(raw, out=target)
            except Exception as exc:  # noqa: BLE001 - a codec error on these bytes is damage
                raise ShardDamage(f"{self.layout.codec} cannot decode chunk {first + j}: {exc}") from None


def file_source(path: str | os.PathLike[str]) -> tuple[Any, int, Any]:
    """(read(offset, n) -> bytes, size, close) over a local shard file, by `os.pread`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
    except OSError:
        os.close(fd)
        raise

    def read(offset: int, n: int) -> bytes:
        data = os.pread(fd, n, offset)
        if len(data) != n:
            raise ShardDamage(f"short read at byte {offset}: {len(data)} of {n} bytes (truncated)")
        return data

    return read, size, lambda: os.close(fd)


def bytes_source(raw: bytes) -> tuple[Any, int, Any]:
    """(read, size, close) over a shard already in memory (a remote store's one-request copy)."""
    return (lambda offset, n: raw[offset:offset + n]), len(raw), (lambda: None)


__all__ = ["ShardDamage", "ShardLayout", "ShardReader", "bytes_source", "file_source"]
