"""A store's build-cache failure reports, merged into one view.

Each unsharded run writes `<store>.failures.json`; each shard of a job array writes its own
`<store>.failures.shard-I-of-N.json` (so concurrent shards never overwrite each other), beside a
local store or beside a remote one on the same storage. After the array, `ctprep info` shows the
merged view and `ctprep verify` writes it as `<store>.failures.json`: every report's failures and
QC flags, duplicates dropped (every shard repeats the labels-CSV problems), and failures of rows that
are written now dropped too (a later run or shard fixed them), so what is left is what is still open.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ctprep import remote
from ctprep.store_files import side_file


def report_files(path: str | Path) -> list[remote.Target]:
    """The store's failure reports that exist: the unsharded one first, then every shard's."""
    whole = side_file(path, "failures")
    shards = remote.glob(f"{str(path).rstrip('/')}.failures.shard-*-of-*.json")
    return ([whole] if remote.exists(whole) else []) + list(shards)


def merge_reports(path: str | Path, written: np.ndarray, volume_names: list[str]) -> dict[str, Any]:
    """The merged view (see the module doc): {reports, unreadable, failures, qc_flagged, warnings,
    resolved}; `resolved` counts failures dropped because their row is written now."""
    row_of = {name: i for i, name in enumerate(volume_names)}
    out: dict[str, Any] = {"reports": [], "unreadable": [], "failures": [], "qc_flagged": [], "warnings": [],
                           "resolved": 0}
    seen: set[tuple[Any, ...]] = set()
    qc_rows: set[Any] = set()
    for target in report_files(path):
        try:
            data = json.loads(remote.read_text(target))
        except (OSError, ValueError) as exc:
            out["unreadable"].append(f"{target}: {type(exc).__name__}")
            continue
        out["reports"].append(str(target))
        for entry in data.get("failures") or []:
            key = (entry.get("volume"), entry.get("row"), entry.get("stage"), entry.get("reason"))
            if key in seen:
                continue
            seen.add(key)
            row = row_of.get(str(entry.get("volume")))
            if row is not None and bool(written[row]):
                out["resolved"] += 1
                continue
            out["failures"].append(entry)
        for entry in data.get("qc_flagged") or []:
            row = entry.get("store_row", row_of.get(str(entry.get("volume"))))
            if row in qc_rows or row is None or not bool(written[int(row)]):
                continue
            qc_rows.add(row)
            out["qc_flagged"].append(entry)
        for warning in data.get("warnings") or []:
            if warning not in out["warnings"]:
                out["warnings"].append(warning)
    return out


def write_merged(path: str | Path, merged: dict[str, Any]) -> remote.Target:
    """Write the merged view as the store's `<store>.failures.json` (atomically)."""
    target = side_file(path, "failures")
    payload = {"store": str(path), "shard": "merged", "merged_from": merged["reports"],
               "failures": merged["failures"], "warnings": merged["warnings"], "qc_flagged": merged["qc_flagged"]}
    remote.write_text(target, json.dumps(payload, indent=2) + "\n")
    return target
