"""Run build-cache tasks: in this process (`--workers 1`) or in worker processes, with progress.

Each worker process opens its own store handle once and writes its rows itself; only a few bytes
per volume travel back. Workers come from the "forkserver" context: the parent runs zarr's event
loop thread, and forking a threaded process is unsafe. Every worker has its own pipe, and the parent
waits on pipes and process sentinels together, so a worker that dies (the kernel's OOM killer,
a segfault in a decoder) is noticed at once and reported for the volume it was processing, in the
manner of nnU-Net's "probably out of RAM" message, instead of hanging the build.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctprep.config import PreprocessConfig

if TYPE_CHECKING:
    from rich.console import Console

    from ctprep.store import CacheStore

# A result is (status, row, stage, payload): ("ok", row, "", qc_flags) or ("fail", row, stage, reason).
Result = tuple[str, int, str, Any]


@dataclass
class Task:
    row: int
    name: str
    line: int          # labels-CSV line, for the report
    path: str
    meta: Any          # ctprep.hu.VolumeMeta | None
    source: str
    file: str          # path relative to the data dir, kept in row_info
    rewrite: bool      # the row was written before (its source changed)


def read(task: Task) -> Any:
    """(image, seconds) for a task's file, or a failure Result naming the read stage."""
    from ctprep.io import VolumeReadError, read_volume

    start = time.perf_counter()
    try:
        return read_volume(Path(task.path)), time.perf_counter() - start
    except VolumeReadError as exc:
        return ("fail", task.row, "read", str(exc))
    except MemoryError:
        return ("fail", task.row, "read", "out of RAM (MemoryError) while reading; use fewer --workers")
    except Exception as exc:  # noqa: BLE001 - one bad volume must not stop the build
        return ("fail", task.row, "read", _describe(exc))


def preprocess(cfg: PreprocessConfig, task: Task, loaded: Any = None) -> Any:
    """The pipeline's PreprocessResult, or a failure Result naming the stage. `loaded` is what
    `read(task)` returned when the read already happened (the inline read-ahead); else it reads."""
    from ctprep import pipeline

    loaded = read(task) if loaded is None else loaded
    if isinstance(loaded, tuple) and isinstance(loaded[0], str):
        return loaded
    image, read_s = loaded
    try:
        result = pipeline.preprocess_image(image, cfg, task.meta)
    except MemoryError:
        return ("fail", task.row, "preprocess", "out of RAM (MemoryError) while preprocessing; "
                "use fewer --workers")
    except Exception as exc:  # noqa: BLE001 - one bad volume must not stop the build
        return ("fail", task.row, "preprocess", _describe(exc))
    result.info["source"]["path"] = task.path
    result.info["timings"] = {"read": round(read_s, 4), **result.info["timings"]}
    return result


def write(store: CacheStore, task: Task, result: Any) -> Result:
    """Write a preprocessed volume to its row (or pass a failure through)."""
    if isinstance(result, tuple):
        return result
    info = dict(result.info)
    info["file"] = task.file
    try:
        store.write_row(task.row, result.images, task.source, info)
    except Exception as exc:  # noqa: BLE001 - reported per row; the row stays unwritten
        return ("fail", task.row, "store", _describe(exc))
    return ("ok", task.row, "", qc_flags(info))


def process(store: CacheStore, cfg: PreprocessConfig, task: Task) -> Result:
    """Preprocess one volume and write its row; every error becomes a failure naming a stage."""
    return write(store, task, preprocess(cfg, task))


def _run_inline(tasks: list[Task], store: CacheStore, cfg: PreprocessConfig, on_result: Any) -> None:
    """One process, three stages in flight: volume k+1 is decoded (a thread) while volume k is
    preprocessed and volume k-1 is compressed and written (another thread). gzip decoding is
    single-threaded and SimpleITK releases the GIL while reading (so do zstd and OpenCV), so the
    preprocessing and the store's cost hide behind the decode on a second core. At most one decoded
    and one finished volume wait in memory besides the one being processed."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctprep-read") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctprep-write") as writer:
        pending = None
        next_read = reader.submit(read, tasks[0]) if tasks else None
        for i, task in enumerate(tasks):
            loaded = next_read.result()
            next_read = reader.submit(read, tasks[i + 1]) if i + 1 < len(tasks) else None
            result = preprocess(cfg, task, loaded)
            del loaded
            if pending is not None:
                on_result(pending.result())
            pending = writer.submit(write, store, task, result)
        if pending is not None:
            on_result(pending.result())


def qc_flags(info: dict[str, Any]) -> list[str]:
    """QC flags the pipeline recorded in a row's info (`qc_flags`)."""
    return [str(f) for f in info.get("qc_flags") or []]


def _describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{at}"


# ---------------------------------------------------------------------------------- worker pool


def _worker_main(conn: Any, store_path: str, cfg: PreprocessConfig, threads: int, storage: Any = None) -> None:
    """Worker loop: receive a Task, send back its Result; None or a closed pipe ends it.

    `storage` is the parent's `remote.StorageConfig`: a worker forked from a forkserver started
    earlier would otherwise see that server's environment, not the parent's current options."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it stops us)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    try:
        import SimpleITK as sitk

        from ctprep import remote

        if storage is not None:
            remote.configure(storage)

        from ctprep.store import CacheStore

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        store = CacheStore(store_path, mode="r+")
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which rejects the run
        conn.send(("init_error", -1, "", _describe(exc)))
        return
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if task is None:
            return
        conn.send(process(store, cfg, task))


class _Slot:
    """One worker process, its pipe, and the task it is working on."""

    def __init__(self, ctx: Any, store_path: str, cfg: PreprocessConfig, threads: int) -> None:
        from ctprep import remote

        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, store_path, cfg, threads, remote.current()),
                                daemon=True)
        self.proc.start()
        child.close()
        self.task: Task | None = None

    def died(self) -> str:
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return f"worker died ({how}) while processing this volume (probably out of RAM; try fewer --workers)"

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        self.conn.close()


def _run_pool(tasks: list[Task], store_path: str, cfg: PreprocessConfig, workers: int, on_result: Any) -> None:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("forkserver")
    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = deque(tasks)
    slots = [_Slot(ctx, store_path, cfg, threads) for _ in range(min(workers, len(tasks)))]
    try:
        for slot in slots:
            _assign(slot, pending)
        while any(s.task is not None for s in slots):
            busy = {}
            for s in slots:
                if s.task is not None:
                    busy[s.conn] = s
                    busy[s.proc.sentinel] = s
            for ready in wait(list(busy)):
                slot = busy[ready]
                if slot.task is None:
                    continue  # its pipe and its sentinel were both ready: already handled
                result = _collect(slot)
                if result is None:
                    continue
                slot.task = None
                on_result(result)
                if not slot.proc.is_alive() and pending:
                    slot.conn.close()
                    slots[slots.index(slot)] = slot = _Slot(ctx, store_path, cfg, threads)
                _assign(slot, pending)
    finally:
        for slot in slots:
            slot.stop()


def _collect(slot: _Slot) -> Result | None:
    """The slot's result, a 'worker died' failure, or None when nothing is there yet."""
    from ctprep.build import BuildError

    task = slot.task
    assert task is not None
    if slot.conn.poll():
        try:
            result = slot.conn.recv()
        except (EOFError, OSError):
            return ("fail", task.row, "worker", slot.died())
        if result[0] == "init_error":
            raise BuildError(f"a worker process could not start: {result[3]}")
        return result
    if not slot.proc.is_alive():
        return ("fail", task.row, "worker", slot.died())
    return None


def _assign(slot: _Slot, pending: deque[Task]) -> None:
    if pending:
        slot.task = pending.popleft()
        # A worker that just died raises here; its sentinel fires and _collect reports it.
        with contextlib.suppress(OSError):
            slot.conn.send(slot.task)


# ---------------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar on a terminal; a plain line every ~10 % otherwise (logs of batch jobs)."""

    def __init__(self, total: int, enabled: bool, console: Console | None) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.console = console
        self.bar = None
        self.every = max(1, total // 10)
        if not enabled or total == 0:
            self.console = None
            return
        from rich.console import Console as RichConsole

        self.console = console or RichConsole(stderr=True)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]build-cache"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task_id = self.bar.add_task("build", total=total, rate="")

    def advance(self) -> None:
        self.done += 1
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task_id, advance=1, rate=f"{rate:.2f} vol/s")
        elif self.console is not None and (self.done % self.every == 0 or self.done == self.total):
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            self.console.print(f"build-cache {self.done}/{self.total} volumes, {rate:.2f} vol/s, ETA {eta:.0f} s",
                               highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------- entry point


def run_tasks(tasks: list[Task], store: CacheStore, cfg: PreprocessConfig, workers: int, report: Any, *,
              progress: bool = True, console: Console | None = None) -> None:
    """Process every task and record results on `report` (a ctprep.build.BuildReport)."""
    by_row = {t.row: t for t in tasks}
    bar = _Progress(len(tasks), progress, console)

    def on_result(result: Result) -> None:
        status, row, stage, payload = result
        task = by_row[row]
        if status == "ok":
            report.written_now += 1
            if payload:
                report.qc_flagged.append({"volume": task.name, "row": task.line, "store_row": row, "flags": payload})
        else:
            if task.rewrite:
                payload += " (the row keeps its earlier cached data)"
            report.failures.append({"volume": task.name, "row": task.line, "reason": payload, "stage": stage})
        bar.advance()

    try:
        if workers == 1 or len(tasks) <= 1:
            _run_inline(tasks, store, cfg, on_result)
        else:
            _run_pool(tasks, str(store.path), cfg, workers, on_result)
    finally:
        bar.close()
