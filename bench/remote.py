"""Remote-store benchmark: the training data path reading the same store locally and from S3.

The S3 server is moto's (`tests/s3server.py`), started in its own process on 127.0.0.1: the reads
cross the loopback interface, not a network, and the server is a Python process on the same cores
as the loader. So the numbers are the cost of the object-store path itself (HTTP requests, s3fs,
the server's CPU), not of a real network's bandwidth or latency; a real bucket adds its round-trip
time to every request, which is what `storage.read_ahead` overlaps. To show that, the loader is
also measured through a local proxy that holds each request `--latency-ms` before passing it on (an
*emulated* round trip, not a network either).

Measured, for the store of `--config` (default: the device's config, as bench/loader.py):
- the upload of the local store to the bucket (MB/s);
- one volume read (`StoreReader.read` of a training window), median ms, local vs remote;
- the loader without augmentation (`VolumeDataset` + `make_loader`, `--workers` processes, the
  data path alone): volumes/s and MB/s of uint8 delivered, local, and remote with read-ahead 1
  (one volume after another) and `--read-ahead` (the volumes of a batch fetched together), then
  both again through the latency proxy.

    python bench/remote.py --quick --json     # last stdout line: the JSON result
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bench_data
import common
import numpy as np

CONFIGS = common.REPO / "configs"
DEVICE_CONFIG = {"cpu": CONFIGS / "demo.yaml", "cuda": CONFIGS / "default.yaml"}


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None, help="experiment YAML (default: the device's config)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--read-ahead", type=int, default=8, help="volumes fetched together per loader process")
    p.add_argument("--batch-size", type=int, default=None, help="volumes per batch (default: the config's)")
    p.add_argument("--volumes", type=int, default=None, help="volumes (default 8, quick 4)")
    p.add_argument("--passes", type=int, default=None, help="passes over the volumes (default 10, quick 5)")
    p.add_argument("--latency-ms", type=float, default=20.0,
                   help="emulated round trip added to every request for the last two rows (0: skip them)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.volumes = args.volumes or (4 if args.quick else 8)
    args.passes = args.passes or (5 if args.quick else 10)
    return args


@contextlib.contextmanager
def latency_proxy(port: int, delay_s: float) -> Iterator[str]:
    """A TCP proxy on 127.0.0.1 to `port` that holds every chunk a client sends for `delay_s`
    before passing it on (a request is one chunk: one emulated round trip per request)."""
    loop = asyncio.new_event_loop()

    async def pipe(reader: Any, writer: Any, delay: float) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_r: Any, client_w: Any) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(client_r, server_w, delay_s), pipe(server_r, client_w, 0.0))

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


def _reads_ms(reader: Any, exp: Any, seed: int, reads: int = 24) -> float:
    from cttrain.data import slice_indices

    times = []
    for i in range(reads):
        idx = slice_indices(reader.depth, exp.data.slices, exp.data.slice_stride, True,
                            np.random.default_rng([seed, i]))
        with common.stopwatch() as t:
            reader.read(i % reader.n, idx)
        times.append(t["s"])
    return round(1000 * statistics.median(times), 2)


def _batch_ms(reader: Any, exp: Any, args: Any, repeats: int = 5) -> dict[str, float]:
    """One batch of `read_ahead` volumes in this process: `read_many` (fetched together) vs the
    same reads one after another; median ms of `repeats` (the overlap alone, no loader)."""
    from cttrain.data import slice_indices

    rows = np.arange(args.read_ahead) % reader.n
    out: dict[str, list[float]] = {"one_after_another_ms": [], "read_many_ms": []}
    for rep in range(repeats):
        reqs = [(int(r), slice_indices(reader.depth, exp.data.slices, exp.data.slice_stride, True,
                                       np.random.default_rng([args.seed, rep, i]))) for i, r in enumerate(rows)]
        with common.stopwatch() as t:
            [reader.read(r, idx) for r, idx in reqs]
        out["one_after_another_ms"].append(t["s"])
        with common.stopwatch() as t:
            reader.read_many(reqs)
        out["read_many_ms"].append(t["s"])
    return {key: round(1000 * statistics.median(v), 1) for key, v in out.items()}


def _loader(reader: Any, exp: Any, args: Any) -> dict[str, Any]:
    """Warm-up pass, then `passes` passes in one loader (as bench/loader.py's (b0))."""
    from cttrain.data import VolumeDataset, make_loader, to_device

    rows = np.flatnonzero(reader.written)

    def epoch(times: int, number: int) -> tuple[int, int]:
        ds = VolumeDataset(reader, np.tile(rows, times), exp.data.slices, exp.data.slice_stride, train=True,
                           seed=args.seed)
        loader = make_loader(ds, args.batch_size, train=True, seed=args.seed, epoch=number,
                             num_workers=args.workers, prefetch=2, pin_memory=False)
        count = nbytes = 0
        for batch in loader:
            x, _y, _rows = to_device(batch, "cpu")
            count, nbytes = count + x.shape[0], nbytes + batch["image"].numel()
        return count, nbytes

    epoch(1, 0)
    with common.stopwatch() as t:
        count, nbytes = epoch(args.passes, 1)
    return {"volumes": count, "seconds": round(t["s"], 3), "volumes_per_s": round(count / t["s"], 3),
            "mb_per_s": round(nbytes / t["s"] / 1e6, 1), "read_ahead": reader.read_ahead}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from ctprep import remote
    from ctprep.store import store_bytes
    from cttrain.config import load_config
    from cttrain.reader import StoreReader

    sys.path.insert(0, str(common.REPO / "tests"))  # the tests' S3 server: one launcher for both
    from s3server import start_s3

    common.limit_threads(1)
    device = common.resolve_device(args.device)
    args.config = args.config or DEVICE_CONFIG["cuda" if device.startswith("cuda") else "cpu"]
    exp = load_config(args.config, args.set)
    args.batch_size = args.batch_size or exp.data.batch_size
    data = bench_data.ensure_data(args.data, args.volumes, args.seed, args.scale)
    store = common.ensure_store(data, args.data, args.config, args.set)
    size = store_bytes(store) or 0
    with tempfile.TemporaryDirectory() as tmp, start_s3(Path(tmp) / "moto.log") as s3:
        remote.configure(remote.StorageConfig(options={"endpoint_url": s3.endpoint, "key": s3.key,
                                                       "secret": s3.secret}, read_ahead=args.read_ahead))
        url = s3.url(store.name)
        common.log(f"uploading {store} ({size / 1e6:.1f} MB) to {url} (moto on {s3.endpoint}, loopback)")
        with common.stopwatch() as up:
            s3.fs().put(str(store), url.split("://", 1)[1], recursive=True)
        near, far = StoreReader(store, exp.data.channels or None), StoreReader(url, exp.data.channels or None)
        common.log("one read: local vs remote")
        read_ms = {"local": _reads_ms(near, exp, args.seed), "remote": _reads_ms(far, exp, args.seed)}
        batch_ms = _batch_ms(far, exp, args)
        common.log(f"loader, {args.workers} workers: local, remote read-ahead 1, remote read-ahead {args.read_ahead}")
        local = _loader(near, exp, args)
        far.read_ahead = 1
        serial = _loader(far, exp, args)
        far.read_ahead = args.read_ahead
        ahead = _loader(far, exp, args)
        slow: dict[str, Any] = {}
        if args.latency_ms > 0:
            with latency_proxy(int(s3.endpoint.rsplit(":", 1)[1]), args.latency_ms / 1000) as proxy:
                remote.configure(remote.StorageConfig(options={"endpoint_url": proxy, "key": s3.key,
                                                               "secret": s3.secret}, read_ahead=args.read_ahead))
                common.log(f"loader through the {args.latency_ms:g} ms latency proxy: read-ahead 1, {args.read_ahead}")
                far = StoreReader(url, exp.data.channels or None)
                slow["read_ms"] = _reads_ms(far, exp, args.seed, reads=8)
                slow["batch_ms"] = _batch_ms(far, exp, args)
                far.read_ahead = 1
                slow["serial"] = _loader(far, exp, args)
                far.read_ahead = args.read_ahead
                slow["ahead"] = _loader(far, exp, args)
    result = {
        "config": str(Path(args.config).resolve().relative_to(common.REPO)), "set": args.set,
        "store": store.name, "store_bytes": size, "rows": int(near.n), "image_shape": list(near.image_shape),
        "upload_s": round(up["s"], 3), "upload_mb_per_s": round(size / up["s"] / 1e6, 1),
        "read_ms": read_ms, "batch_ms": batch_ms,
        "loader_local": local, "loader_remote_serial": serial, "loader_remote": ahead,
        "remote_over_local": round(ahead["volumes_per_s"] / local["volumes_per_s"], 3),
        "read_ahead_gain": round(ahead["volumes_per_s"] / serial["volumes_per_s"], 3),
        "latency_ms": args.latency_ms, "with_latency": slow,
        "workers": args.workers, "batch_size": args.batch_size, "server": "moto (loopback, same machine)",
        "quick": args.quick, "machine": common.machine_info(),
    }
    rows = [("upload to the bucket", f"{result['upload_mb_per_s']} MB/s", f"{result['upload_s']} s", ""),
            ("one read (median)", f"{read_ms['local']} ms local", f"{read_ms['remote']} ms remote", ""),
            (f"remote batch of {args.read_ahead} volumes", f"{batch_ms['one_after_another_ms']} ms one by one",
             f"{batch_ms['read_many_ms']} ms read_many", "")]
    for name, r in (("loader local", local), ("loader remote, read-ahead 1", serial),
                    (f"loader remote, read-ahead {args.read_ahead}", ahead)):
        rows.append((name, f"{r['volumes_per_s']} volumes/s", f"{r['mb_per_s']} MB/s", f"{r['volumes']} volumes"))
    if slow:
        lat = f"+{args.latency_ms:g} ms emulated"
        rows.append((f"one read (median), {lat}", f"{slow['read_ms']} ms", "", ""))
        rows.append((f"remote batch of {args.read_ahead} volumes, {lat}",
                     f"{slow['batch_ms']['one_after_another_ms']} ms one by one",
                     f"{slow['batch_ms']['read_many_ms']} ms read_many", ""))
        for name, r in ((f"loader remote {lat}, read-ahead 1", slow["serial"]),
                        (f"loader remote {lat}, read-ahead {args.read_ahead}", slow["ahead"])):
            rows.append((name, f"{r['volumes_per_s']} volumes/s", f"{r['mb_per_s']} MB/s", f"{r['volumes']} volumes"))
    common.emit("remote", result, args, rows, ("what", "", "", ""),
                f"remote store (moto S3 on loopback): {near.n} rows of {tuple(near.image_shape)}, "
                f"batch {args.batch_size}, {args.workers} workers")
    return result


if __name__ == "__main__":
    main()
