"""The cached path's read, measured apart from the loader (`bench/loader.py` calls these):
the direct shard read against zarr's own path, the DataLoader worker hand-off, and the cost of
the chunks' crc32c checksums."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common
import numpy as np


def read_speed(store: Path, exp: Any, args: Any, reads: int = 200) -> dict[str, float]:
    """One thread, training windows: ms per read and MB/s of uint8 delivered (K slices) and
    decoded (the whole chunks holding them), by the direct shard read and through zarr."""
    from cttrain.data import slice_indices
    from cttrain.reader import StoreReader

    k, stride = exp.data.slices, exp.data.slice_stride
    out: dict[str, float] = {}
    for name, direct in (("direct", True), ("zarr", False)):
        reader = StoreReader(store, exp.data.channels or None)
        reader.direct = direct and reader.direct
        plans = [(i % reader.n, slice_indices(reader.depth, k, stride, True, np.random.default_rng([args.seed, i])))
                 for i in range(reads)]
        reader.read(*plans[0])
        cs, per_slice = reader.chunk_slices, int(np.prod(reader.image_shape[1:]))
        decoded = sum((int(idx.max()) // cs - int(idx.min()) // cs + 1) * cs * per_slice for _, idx in plans)
        with common.stopwatch() as t:
            delivered = sum(reader.read(row, idx).nbytes for row, idx in plans)
        out[f"{name}_ms"] = round(1000 * t["s"] / reads, 2)
        prefix = "zarr_" if name == "zarr" else ""
        out[f"{prefix}delivered_mb_per_s"] = round(delivered / t["s"] / 1e6, 1)
        out[f"{prefix}decoded_mb_per_s"] = round(decoded / t["s"] / 1e6, 1)
    return out


def handoff_cost(reader: Any, exp: Any, args: Any, batches: int = 50) -> dict[str, float]:
    """ms per batch a DataLoader worker spends handing a batch over, beyond the reads: torch's
    collate stacks a worker's batch into a NEW shared-memory block (allocation + first-touch page
    faults), and the main process maps it; `stack_ms` is the same stack into ordinary memory."""
    import torch

    shape = (args.batch_size, exp.data.slices, reader.num_channels, *reader.image_shape[2:])
    items = [torch.randint(0, 255, shape[1:], dtype=torch.uint8) for _ in range(shape[0])]
    numel = int(np.prod(shape))

    def shared() -> None:
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(numel)).view(shape)
        torch.stack(items, out=out)

    times = {}
    for name, fn in (("stack_ms", lambda: torch.stack(items)), ("shared_stack_ms", shared)):
        fn()
        with common.stopwatch() as t:
            for _ in range(batches):
                fn()
        times[name] = round(1000 * t["s"] / batches, 2)
    return times


def checksum_cost(store: Path, exp: Any, args: Any, work: Path, reads: int = 24) -> dict[str, float]:
    """Milliseconds per training read with and without the chunks' crc32c check: the store's
    `images` against a copy of its first rows with the same chunks, shards and compressor but no
    crc32c codec, both read as the reader reads them (the direct shard read of each read's chunk
    span, `ctprep.shard_read`), alternating."""
    import shutil

    import zarr

    from cttrain.data import slice_indices

    src = zarr.open_group(str(store), mode="r")["images"]
    n = min(src.shape[0], 4)
    codecs = [c for c in src.metadata.codecs[0].codecs[1:] if type(c).__name__ != "Crc32cCodec"]
    path = work / "checksum-probe.zarr"
    shutil.rmtree(path, ignore_errors=True)
    plain = zarr.create_array(str(path), shape=(n, *src.shape[1:]), dtype=src.dtype, chunks=src.chunks,
                              shards=src.shards, compressors=codecs, fill_value=0)
    plain[:] = src[:n]
    from ctprep.shard_read import ShardLayout, ShardReader, file_source

    k, stride, cs = exp.data.slices, exp.data.slice_stride, src.chunks[1]
    # each array's decoder and folder: the store's `images`, and the probe array at `path`
    decoders = {name: (ShardReader(ShardLayout.of(arr)), folder)
                for name, arr, folder in (("with_crc32c", src, Path(store) / "images"), ("without", plain, path))}
    block = np.empty((src.shape[1], *src.shape[2:]), dtype=np.uint8)
    totals = {"with_crc32c": 0.0, "without": 0.0}
    for i in range(reads):
        idx = slice_indices(src.shape[1], k, stride, True, np.random.default_rng([args.seed, i]))
        first, last = int(idx.min()) // cs, int(idx.max()) // cs
        key = src.metadata.encode_chunk_key((i % n, 0, 0, 0, 0))
        for name in ("with_crc32c", "without")[:: 1 if i % 2 else -1]:
            decoder, folder = decoders[name]
            with common.stopwatch() as t:
                read, size, close = file_source(folder / key)
                decoder.decode(read, size, decoder.index(read, size), first, last, block[: (last - first + 1) * cs])
                close()
            totals[name] += t["s"]
    shutil.rmtree(path, ignore_errors=True)
    out = {f"{key}_ms": round(1000 * v / reads, 2) for key, v in totals.items()}
    out["cost_pct"] = round(100 * (totals["with_crc32c"] / totals["without"] - 1), 1)
    return out
