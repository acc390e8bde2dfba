"""`ctprep build-cache`: fill (or resume) the store from a labels CSV and a data directory.

Decisions a user can rely on:

- Rows are the valid labels-CSV rows in CSV order (inputs.py has the rules). A row whose file is
  missing or unreadable keeps its store row, unwritten; it is reported, and a later run retries it.
- A row is skipped when `written` and its source fingerprint (file sizes + mtimes, plus its
  metadata values) is unchanged; so a re-run after `kill -9` completes only what is missing and a
  re-run over a finished store only reads the small per-row arrays (written, source, row_info,
  labels) and `stat`s the files. A redo that fails leaves the row's earlier data in place.
- A store built with another preprocess config, or other rows/labels, is refused naming what
  differs. `overwrite` builds into `<out>.overwrite-tmp` and swaps it in at the end, unless the new
  store holds fewer written rows than the old one (then the old one is kept and the run says so).
- Exit semantics (`BuildReport.ok`): any failure fails the run. QC flags (e.g. a constant image)
  do not: those volumes are cached and listed loudly in the report and in the failure report.
- The failure report goes beside the store, named after it (`ctrate.zarr.failures.json`, see
  `ctprep.store.side_file`), so two stores in one folder keep their own; with `--shard I/N` (N > 1)
  each shard writes `<store>.failures.shard-I-of-N.json` so concurrent shards do not overwrite
  each other's report (`ctprep info` and `verify` merge them).
- `--out` may be an fsspec URL (`s3://bucket/prefix/store.zarr`): the shards of a job array then
  create and fill one store on object storage without locks (`ctprep.remote_store`), their reports
  beside it in the bucket. `create_only` creates (or validates) the store and builds nothing: run
  it once before the array.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctprep import inputs
from ctprep.build_report import print_report, write_failures  # noqa: F401 - print_report: the CLI's, from here
from ctprep.config import PreprocessConfig
from ctprep.naming import patient_id
from ctprep.workers import Task, qc_flags

if TYPE_CHECKING:
    from rich.console import Console

    from ctprep.store import CacheStore

class BuildError(Exception):
    """The whole run is rejected before anything is written; the message is one line."""


@dataclass
class BuildReport:
    """What a run did. Failures are `{volume, row, reason, stage}` with `row` the labels-CSV line and
    stage one of labels, find, metadata, read, preprocess, store, worker; QC entries are
    `{volume, row, store_row, flags}` and list every flagged row of this shard, old or new."""

    store: str
    rows: int = 0                   # rows in the store
    written_now: int = 0
    already_done: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    qc_flagged: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    failures_path: Path | str | None = None
    shard: tuple[int, int] = (0, 1)
    to_do: int = 0                  # rows this run tried to (re)build

    @property
    def ok(self) -> bool:
        return not self.failures


def parse_shard(text: str) -> tuple[int, int]:
    """`"I/N"` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(p) for p in text.strip().split("/"))
    except ValueError:
        raise BuildError(f"--shard must look like I/N (e.g. 0/4), got '{text}'") from None
    if n < 1 or not 0 <= i < n:
        raise BuildError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return i, n


def failures_path_for(out: str | Path, shard: tuple[int, int]) -> Path | str:
    from ctprep.store import side_file

    return side_file(out, "failures", shard)


# ------------------------------------------------------------------------------ store handling


def _store_state(path: str) -> str:
    """'absent' | 'store' | 'empty' (an empty directory) | 'other'; remote also 'creating'."""
    if "://" in path:
        from ctprep.remote_store import state

        return state(path)
    p = Path(path)
    if not p.exists():
        return "absent"
    if (p / "zarr.json").exists():
        return "store"
    return "empty" if p.is_dir() and not any(p.iterdir()) else "other"


def _create(path: str, table: inputs.LabelTable, cfg: PreprocessConfig) -> CacheStore:
    """Create the store atomically (build beside, then rename), so a kill never leaves half a store."""
    import numpy as np

    from ctprep.store import CacheStore, create_store

    names = [r.name for r in table.rows]
    kwargs = dict(volume_names=names, patient_ids=[patient_id(n) for n in names],
                  labels=np.array([r.labels for r in table.rows], dtype=np.uint8).reshape(len(names), -1),
                  label_names=table.label_names, cfg=cfg)
    if "://" in path:
        from ctprep.remote_store import create_remote

        create_remote(path, **kwargs)
        store = CacheStore(path, mode="r+")
        _validate(store, table, cfg)  # a racing creator with other inputs, where claims are not exclusive
        return store
    target = Path(path)
    for stale in target.parent.glob(f"{target.name}.creating-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a creator killed earlier (we hold the lock)
    tmp = target.parent / f"{target.name}.creating-{os.getpid()}"
    create_store(tmp, **kwargs)
    if target.exists():
        target.rmdir()  # only ever an empty directory here (see _store_state)
    os.rename(tmp, target)
    return CacheStore(path, mode="r+")


def _validate(store: CacheStore, table: inputs.LabelTable, cfg: PreprocessConfig) -> None:
    import numpy as np

    from ctprep import CACHE_VERSION
    from ctprep.config import to_dict
    from ctprep.store import config_diff, fingerprint

    hint = "use --overwrite to rebuild it, or --out for a new store"
    if store.fingerprint != fingerprint(cfg):
        diff = config_diff(store.preprocess, to_dict(cfg))
        if diff:
            raise BuildError(f"{store.path} was built with another preprocess config ({'; '.join(diff)}); {hint}")
        raise BuildError(f"{store.path} was built by cache version {store.attrs.get('cache_version')} "
                         f"(this code writes {CACHE_VERSION}); {hint}")
    names = [r.name for r in table.rows]
    if store.volume_names != names:
        first = next((i for i, (a, b) in enumerate(zip(store.volume_names, names, strict=False)) if a != b),
                     min(len(names), store.n))
        old = store.volume_names[first] if first < store.n else "(end)"
        new = names[first] if first < len(names) else "(end)"
        raise BuildError(f"{store.path} holds other rows than the labels CSV ({store.n} vs {len(names)} valid rows; "
                         f"row {first}: '{old}' vs '{new}'); {hint}")
    if store.label_names != table.label_names:
        raise BuildError(f"{store.path} has label columns {store.label_names}, the CSV has {table.label_names}; {hint}")
    ours = np.array([r.labels for r in table.rows], dtype=np.uint8)
    diff_rows = np.flatnonzero((store.labels() != ours).any(axis=1))
    if diff_rows.size:
        example = names[diff_rows[0]]
        raise BuildError(f"{store.path}: labels changed for {diff_rows.size} row(s) (e.g. '{example}'); {hint}")


def _open_or_create(path: str, lock_path: str, table: inputs.LabelTable, cfg: PreprocessConfig,
                    replace: bool) -> CacheStore:
    """Under the creation lock: whoever finds no store creates it; everyone else validates it.

    `replace`: a store at `path` that does not match is rebuilt (the --overwrite temporary store);
    a matching one is resumed."""
    from ctprep.store import CacheStore, StoreError, creation_lock

    with creation_lock(lock_path):
        _finish_interrupted_swap(lock_path)
        state = _store_state(path)
        if state == "other":
            raise BuildError(f"--out {path} exists and is not a zarr store; refusing to write into it")
        if state == "creating":  # remote: another shard is creating it (or was killed doing so)
            return _create(path, table, cfg)
        if state == "store":
            try:
                store = CacheStore(path, mode="r+")
                _validate(store, table, cfg)
                return store
            except (StoreError, BuildError) as exc:
                if not replace:
                    hint = "" if isinstance(exc, BuildError) else "; use --overwrite to replace it, or --out"
                    raise BuildError(f"{exc}{hint}") from None
            shutil.rmtree(path)
        return _create(path, table, cfg)


def _finish_interrupted_swap(out: str) -> None:
    """A kill between the two renames of `_swap_in` leaves `out` missing: finish (or undo) the swap."""
    old, new = f"{out}.old-tmp", f"{out}.overwrite-tmp"
    if "://" in out or Path(out).exists() or not Path(old).exists():
        return
    if (Path(new) / "zarr.json").exists():
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(old, out)


def _swap_in(tmp: str, out: str, report: BuildReport) -> None:
    """Replace `out` by the finished `tmp` unless that would lose written rows."""
    from ctprep.store import CacheStore, creation_lock

    new_written = int(CacheStore(tmp).written().sum())
    with creation_lock(out):
        try:
            old_written = int(CacheStore(out).written().sum())
        except Exception:  # noqa: BLE001 - an unreadable old store is simply replaced
            old_written = -1
        if new_written < old_written:
            report.warnings.append(
                f"--overwrite: the new store has {new_written} written rows, the old one {old_written}; "
                f"the old store is kept and the new one left at {tmp} (fix the failures, re-run to resume)")
            return
        old = f"{out}.old-tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ planning


def _plan(store: CacheStore, table: inputs.LabelTable, index: inputs.FileIndex,
          meta: dict[str, inputs.MetaEntry], shard: tuple[int, int],
          report: BuildReport) -> list[Task]:
    """Rows of this shard that need work; skipped, failed and QC-flagged rows go to the report."""
    from ctprep.io import VolumeReadError, source_fingerprint
    from ctprep.store import clean_stale_temp_files

    written = store.written()
    i, n = shard
    if n == 1 and not written.all():
        # A killed writer's temp files imply an unwritten row; unsharded, nobody else is writing.
        clean_stale_temp_files(store.path)
    if store.remote:  # one request per row: read only this shard's written rows
        done = [r for r in range(i, len(table.rows), n) if written[r]]
        sources = dict(zip(done, store.sources(done), strict=True))
        infos = dict(zip(done, store.all_row_info(done), strict=True))
    else:
        sources, infos = dict(enumerate(store.sources())), dict(enumerate(store.all_row_info()))
    tasks = []
    for row in range(i, len(table.rows), n):
        entry = table.rows[row]
        path, reason = inputs.resolve_volume(index, entry.name)
        if path is None:
            report.failures.append(inputs.failure(entry.name, entry.line, reason, "find"))
            continue
        m = meta.get(entry.key)
        if m is not None and m.error:
            report.failures.append(inputs.failure(entry.name, entry.line, m.error, "metadata"))
            continue
        try:
            source = source_fingerprint(path)
        except (OSError, VolumeReadError) as exc:
            report.failures.append(inputs.failure(entry.name, entry.line, str(exc), "find"))
            continue
        source += inputs.meta_fingerprint(m.values if m else None)
        if written[row] and sources[row] == source:
            report.already_done += 1
            if qc_flags(infos[row]):
                report.qc_flagged.append({"volume": entry.name, "row": entry.line, "store_row": row,
                                          "flags": qc_flags(infos[row])})
            continue
        tasks.append(Task(row, entry.name, entry.line, str(path), _volume_meta(m), source,
                          str(path.relative_to(index.root)), bool(written[row])))
    return tasks


def _volume_meta(entry: inputs.MetaEntry | None) -> Any:
    if entry is None or not entry.values or not any(v is not None for v in entry.values.values()):
        return None
    from ctprep.hu import VolumeMeta

    v = entry.values
    return VolumeMeta(slope=v["RescaleSlope"], intercept=v["RescaleIntercept"],
                      xy_spacing=v["XYSpacing"], z_spacing=v["ZSpacing"])


# ---------------------------------------------------------------------------------- the build


def build_cache(data_dir: Path, labels_csv: Path, out: str | Path, cfg: PreprocessConfig, *,
                metadata_csv: Path | None = None, workers: int = 1, shard: tuple[int, int] = (0, 1),
                overwrite: bool = False, progress: bool = True, console: Console | None = None,
                create_only: bool = False) -> BuildReport:
    """Create or complete the store at `out`; per-volume problems are reported, not raised.
    `create_only`: create (or validate) the store and its rows, build nothing (before a job array)."""
    from ctprep.workers import run_tasks

    start = time.perf_counter()
    out = str(out)
    if workers < 1:
        raise BuildError(f"--workers must be >= 1, got {workers}")
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise BuildError(f"--shard {i}/{n}: need N >= 1 and 0 <= I < N")
    if create_only and overwrite:
        raise BuildError("--create-only cannot be combined with --overwrite")
    if overwrite and n > 1:
        raise BuildError("--overwrite cannot be combined with --shard N>1: rebuild with one process "
                         "(or delete the store and start the shards again)")
    try:
        table = inputs.read_labels(Path(labels_csv))
        meta, meta_warnings = inputs.read_metadata(Path(metadata_csv)) if metadata_csv else ({}, [])
        index = inputs.index_data_dir(Path(data_dir))
    except inputs.InputError as exc:
        raise BuildError(str(exc)) from None
    if not table.rows:
        first = table.failures[0]["reason"] if table.failures else "it has no data rows"
        raise BuildError(f"labels CSV {labels_csv} has no valid rows ({first})")
    report = BuildReport(store=out, rows=len(table.rows), shard=shard, failures=list(table.failures),
                         warnings=table.warnings + meta_warnings, failures_path=failures_path_for(out, shard))
    _warn_unreferenced(report, index, table)
    swap = overwrite and _store_state(out) == "store"
    if swap and "://" in out:
        raise BuildError(f"--overwrite of the remote store {out} is not supported: delete it first")
    target = f"{out}.overwrite-tmp" if swap else out
    store = _open_or_create(target, out, table, cfg, replace=overwrite)
    if create_only:
        report.already_done = int(store.written().sum())
        report.elapsed_s = time.perf_counter() - start
        report.failures_path = None  # nothing was tried: the shards' reports are theirs to write
        return report
    tasks = _plan(store, table, index, meta, shard, report)
    report.to_do = len(tasks)
    if progress and console is not None:
        console.print(f"build-cache: {len(tasks)} volume(s) to build, {report.already_done} already done"
                      + (f", shard {i}/{n}" if n > 1 else ""), highlight=False)
    run_tasks(tasks, store, cfg, workers, report, progress=progress, console=console)
    if swap:
        _swap_in(target, out, report)
    report.elapsed_s = time.perf_counter() - start
    write_failures(report)
    return report


def _warn_unreferenced(report: BuildReport, index: inputs.FileIndex, table: inputs.LabelTable) -> None:
    extra = inputs.unreferenced(index, (r.key for r in table.rows))
    extra_failed = {inputs.case_key(f["volume"]) for f in table.failures}
    extra = [p for p in extra if inputs.case_key(p) not in extra_failed]
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        report.warnings.append(f"{len(extra)} volume file(s) under --data-dir have no row in the labels CSV "
                               f"and are not cached: {shown}")
