"""Inputs of `ctprep build-cache`: the labels CSV, the optional metadata CSV and the volume files.

Rules (each decided once, so a build is deterministic):

- Labels CSV: `VolumeName` plus label columns. When the header holds any CT-RATE label, the label
  columns are the CT-RATE labels present, in CSV order, and other columns are ignored (a warning
  names them); otherwise every column but `VolumeName` is a label. A value must be 0 or 1 (`1.0`
  is accepted); a row with any other value is a failure naming its line and column and gets no
  store row.
- Duplicate names (compared by case id, so `x.nii.gz` and `x.mha` are the same volume): the first
  row is kept. A later duplicate with the same labels is a warning; one with different labels is a
  failure, because the labels of that volume are ambiguous.
- Volume files are found by case id anywhere under `--data-dir`, which is indexed once with
  `os.scandir`. Several candidates for one case id: the one whose file name equals the CSV name
  wins, else a file wins over a DICOM directory, else the row fails as ambiguous (naming the
  candidates). Names and symlinks that resolve outside `--data-dir` are refused.
- A DICOM series directory is recognised by content, not by file names: a folder holding a `.dcm`
  file or a file with the `DICM` magic at byte 128 (the DICOM Part 10 preamble). Real exports name
  slices after their SOP Instance UID (`CT.1.3.12.2...`, no `.dcm`), so names cannot be trusted.
  The series inside is chosen at read time by GDCM (`ctprep.io`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprep.naming import LABEL_NAMES, VOLUME_SUFFIXES, strip_volume_suffix

METADATA_COLUMNS = ("XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope")


class InputError(Exception):
    """The labels or metadata CSV cannot be used at all (missing file, header, columns)."""


@dataclass
class LabelRow:
    name: str          # VolumeName as written in the CSV
    key: str           # case id: the name without directory and known suffix
    line: int          # line number in the CSV (header = line 1)
    labels: list[int]


@dataclass
class LabelTable:
    label_names: list[str]
    rows: list[LabelRow]
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def failure(volume: str, line: int | None, reason: str, stage: str) -> dict[str, Any]:
    """One entry of the failure list (also the shape written to `<store>.failures.json`)."""
    return {"volume": volume, "row": line, "reason": reason, "stage": stage}


def case_key(name: str) -> str:
    return strip_volume_suffix(Path(name.replace("\\", "/")).name)


def _open_csv(path: Path, what: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line, row) pairs; a BOM (Excel export) is tolerated."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{what} {path} cannot be read as CSV: {exc}") from None
    if "VolumeName" not in header:
        raise InputError(f"{what} {path} has no 'VolumeName' column (header: {', '.join(header) or 'empty'})")
    return header, rows


def _label_value(text: str | None) -> int | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def read_labels(path: Path) -> LabelTable:
    """Parse and validate the labels CSV (see the module docstring for the rules)."""
    header, raw_rows = _open_csv(path, "labels CSV")
    known = [h for h in header if h in LABEL_NAMES]
    label_names = known or [h for h in header if h != "VolumeName" and h]
    if not label_names:
        raise InputError(f"labels CSV {path} has no label columns besides 'VolumeName'")
    table = LabelTable(label_names, [])
    ignored = [h for h in header if h not in label_names and h != "VolumeName"]
    if ignored:
        table.warnings.append(f"labels CSV: ignored non-label columns {', '.join(map(repr, ignored))}")
    first: dict[str, LabelRow] = {}
    for line, raw in raw_rows:
        name = (raw.get("VolumeName") or "").strip()
        if not name:
            table.failures.append(failure("", line, f"{path.name} line {line}: empty VolumeName", "labels"))
            continue
        row = _parse_label_row(path, line, name, raw, label_names, table)
        if row is None:
            continue
        if row.key in first:
            kept = first[row.key]
            msg = f"{path.name} line {line}: duplicate of line {kept.line} ('{kept.name}'); the first row is kept"
            if row.labels == kept.labels:
                table.warnings.append(msg)
            else:
                table.failures.append(failure(name, line, msg + " and the labels differ", "labels"))
            continue
        first[row.key] = row
        table.rows.append(row)
    return table


def _parse_label_row(path: Path, line: int, name: str, raw: dict[str, Any], label_names: list[str],
                     table: LabelTable) -> LabelRow | None:
    values = []
    for col in label_names:
        text = raw.get(col)
        value = _label_value(text if isinstance(text, str) else None)
        if value is None:
            shown = "missing" if text is None else repr(text)
            table.failures.append(failure(
                name, line, f"{path.name} line {line}, column '{col}': {shown} is not 0 or 1", "labels"))
            return None
        values.append(value)
    return LabelRow(name, case_key(name), line, values)


# ---------------------------------------------------------------------------------------- metadata


def _number(text: str, what: str, positive: bool = False, nonzero: bool = False) -> float:
    value = float(text)
    if not math.isfinite(value) or (positive and value <= 0) or (nonzero and value == 0):
        raise ValueError(f"{what} must be a finite{' positive' if positive else ''}"
                         f"{' non-zero' if nonzero else ''} number")
    return value


def _xy_spacing(text: str) -> tuple[float, float]:
    parts = [p for p in text.strip().strip("[]()").replace(",", " ").split() if p]
    if len(parts) != 2:
        raise ValueError("expected two numbers like '[0.75, 0.75]'")
    a, b = (_number(p, "XYSpacing", positive=True) for p in parts)
    return (a, b)


def _meta_values(raw: dict[str, Any]) -> dict[str, Any]:
    """Column -> parsed value (None when empty); ValueError names the column."""
    parsers = {
        "XYSpacing": _xy_spacing,
        "ZSpacing": lambda t: _number(t, "ZSpacing", positive=True),
        "RescaleIntercept": lambda t: _number(t, "RescaleIntercept"),
        "RescaleSlope": lambda t: _number(t, "RescaleSlope", nonzero=True),
    }
    out: dict[str, Any] = {}
    for col, parse in parsers.items():
        text = (raw.get(col) or "").strip()
        if not text:
            out[col] = None
            continue
        try:
            out[col] = parse(text)
        except ValueError as exc:
            detail = str(exc) if "must" in str(exc) or "expected" in str(exc) else "not a number"
            raise ValueError(f"column '{col}': {text!r} ({detail})") from None
    return out


@dataclass
class MetaEntry:
    values: dict[str, Any] | None   # parsed columns, None when the row is malformed
    error: str | None = None        # reason naming line and column


def read_metadata(path: Path) -> tuple[dict[str, MetaEntry], list[str]]:
    """Case id -> metadata entry. A malformed value fails only that volume (at build time)."""
    header, raw_rows = _open_csv(path, "metadata CSV")
    warnings = []
    missing = [c for c in METADATA_COLUMNS if c not in header]
    if missing:
        warnings.append(f"metadata CSV: no column(s) {', '.join(missing)}; those values come from the files")
    out: dict[str, MetaEntry] = {}
    for line, raw in raw_rows:
        key = case_key((raw.get("VolumeName") or "").strip())
        if not key or key in out:
            continue  # first row wins, as for labels
        try:
            out[key] = MetaEntry(_meta_values(raw))
        except ValueError as exc:
            out[key] = MetaEntry(None, f"metadata CSV {path.name} line {line}, {exc}")
    return out, warnings


def meta_fingerprint(values: dict[str, Any] | None) -> str:
    """Part of a row's source fingerprint: a changed slope/intercept/spacing redoes the row."""
    return "" if not values else json.dumps(values, sort_keys=True)


# ------------------------------------------------------------------------------------ file index


@dataclass
class Candidate:
    path: Path
    kind: str                    # "file" or "dicom" (a series directory)
    outside: Path | None = None  # resolved target when a symlink leaves the data dir


@dataclass
class FileIndex:
    root: Path
    by_key: dict[str, list[Candidate]]


def _volume_key(name: str) -> str | None:
    lower = name.lower()
    return next((name[: -len(s)] for s in VOLUME_SUFFIXES if lower.endswith(s)), None)


DICOM_MAGIC_OFFSET = 128  # DICOM PS3.10: a 128-byte preamble, then b"DICM"


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True when the file carries the DICOM Part 10 magic (`DICM` at byte 128), or is named `.dcm`.

    Reads 132 bytes: cheap enough to run on every non-volume file of a data dir. A `.dcm` file
    without a preamble (old ACR-NEMA style) is still taken on its name; GDCM reads those too."""
    if os.fspath(path).lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(DICOM_MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def index_data_dir(data_dir: Path) -> FileIndex:
    """Walk the tree once. Symlinked directories are followed only while they stay inside; zarr
    stores are skipped."""
    root = Path(data_dir).resolve()
    if not root.is_dir():
        raise InputError(f"--data-dir {data_dir} is not a directory")
    by_key: dict[str, list[Candidate]] = {}
    seen = {root}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # unreadable folder: its volumes show up as missing, naming the name
        if any(e.name == "zarr.json" for e in entries):
            continue  # a zarr store (e.g. the cache itself under --data-dir) is never an input
        others = [e for e in entries if _index_entry(e, root, by_key, seen, stack)]
        # Content check: stops at the first DICOM file, so a series folder costs one small read.
        if folder != root and any(is_dicom_file(e.path) for e in others):
            by_key.setdefault(folder.name, []).append(Candidate(folder, "dicom"))
    return FileIndex(root, by_key)


def _index_entry(entry: os.DirEntry, root: Path, by_key: dict[str, list[Candidate]],
                 seen: set[Path], stack: list[Path]) -> bool:
    """Index one directory entry; True when it is a plain file that is not a volume file (a
    possible DICOM slice, decided by content in the caller)."""
    path = Path(entry.path)
    link = entry.is_symlink()
    target = path.resolve() if link else path
    if entry.is_dir():
        if link and not _inside(target, root):
            by_key.setdefault(entry.name, []).append(Candidate(path, "dicom", outside=target))
        elif target not in seen:
            seen.add(target)
            stack.append(target if link else path)
        return False
    key = _volume_key(entry.name)
    if key is not None:
        outside = target if link and not _inside(target, root) else None
        by_key.setdefault(key, []).append(Candidate(path, "file", outside=outside))
        return False
    return entry.is_file() and not entry.name.startswith(".")


def resolve_volume(index: FileIndex, name: str) -> tuple[Path | None, str | None]:
    """(path, None) or (None, reason) for one CSV VolumeName."""
    clean = name.replace("\\", "/")
    if "/" in clean or clean in ("..", "."):
        target = (index.root / clean).resolve()
        if not _inside(target, index.root):
            return None, f"'{name}' resolves outside --data-dir {index.root} (refused)"
        if target.exists():
            return target, None
    cands = index.by_key.get(case_key(name), [])
    if not cands:
        return None, (f"no file for '{name}' under {index.root} (looked for {case_key(name)} with "
                      f"{', '.join(VOLUME_SUFFIXES)} or a DICOM series directory)")
    exact = [c for c in cands if c.path.name == Path(clean).name]
    files = [c for c in cands if c.kind == "file"]
    pick = exact if len(exact) == 1 else files if len(files) == 1 else cands
    if len(pick) > 1:
        shown = ", ".join(str(c.path.relative_to(index.root)) for c in pick[:4])
        return None, f"ambiguous: {len(pick)} candidates for '{name}' ({shown}); keep one under --data-dir"
    chosen = pick[0]
    if chosen.outside is not None:
        return None, f"{chosen.path} is a symlink to {chosen.outside}, outside --data-dir {index.root} (refused)"
    return chosen.path, None


def unreferenced(index: FileIndex, keys: Iterable[str]) -> list[str]:
    """Volume files and DICOM series directories under the data dir that no CSV row names
    (a directory symlink leaving the data dir is not listed: its content was never looked at)."""
    wanted = set(keys)
    out = []
    for key, cands in index.by_key.items():
        if key in wanted:
            continue
        out += [str(c.path.relative_to(index.root)) for c in cands if c.kind == "file" or c.outside is None]
    return sorted(out)
