"""`ctprep info` and `ctprep preview`: what is in a store, and what its pixels look like."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ctprep import remote
from ctprep.folds import fold_table
from ctprep.reports import merge_reports
from ctprep.store import CacheStore, StoreError, open_store, side_file, store_bytes


def store_info(path: str | Path) -> dict[str, Any]:
    """Counts, shape, windows, written/failed rows, HU rules, QC flags and the fold table."""
    store = open_store(path)
    written = store.written()
    labels = store.labels()
    folds = store.folds()
    infos = store.all_row_info()
    rules = Counter(i.get("hu_rule", "?") for i, w in zip(infos, written, strict=True) if w)
    qc = [
        {"volume": store.volume_names[i], "flags": info.get("qc_flags", [])}
        for i, info in enumerate(infos) if written[i] and info.get("qc_flags")
    ]
    nbytes = store_bytes(path)
    images_bytes = int(np.prod(store.array("images").shape))
    return {
        "path": str(path),
        "schema": store.attrs["schema"],
        "fingerprint": store.fingerprint,
        "volumes": store.n,
        "patients": len(set(store.patient_ids)),
        "written": int(written.sum()),
        "not_written": [store.volume_names[i] for i in np.flatnonzero(~written)],
        "shape": {"D": store.image_shape[0], "C": store.image_shape[1],
                  "H": store.image_shape[2], "W": store.image_shape[3]},
        "windows": store.windows,
        "label_names": store.label_names,
        "positives": {n: int(labels[written, j].sum()) for j, n in enumerate(store.label_names)},
        "hu_rules": dict(rules),
        "qc_flagged": qc,
        "folds": fold_table(folds, store.patient_ids, labels, store.label_names, written)
        if (folds >= 0).any() else None,
        "folds_meta": store.attrs.get("folds"),
        "bytes_on_disk": nbytes,
        "compression_ratio": (images_bytes * written.mean() / nbytes) if nbytes and written.any() else None,
        "preprocess": store.preprocess,
        "side_files": side_files(path),
        "failure_reports": _merged_summary(path, written, store.volume_names),
    }


def _merged_summary(path: str | Path, written: np.ndarray, names: list[str]) -> dict[str, Any]:
    """The failure reports of every build-cache run and shard, merged (`ctprep.reports`)."""
    merged = merge_reports(path, written, names)
    return {"reports": merged["reports"], "unreadable": merged["unreadable"], "open": merged["failures"],
            "resolved": merged["resolved"], "qc_flagged": len(merged["qc_flagged"])}


def side_files(path: str | Path) -> dict[str, Any]:
    """The store's side files: {kind: {path, exists}}, plus shard failure reports found beside it
    and files under the old shared names (`failures.json`, `folds.json` in the parent folder,
    written before side files were named per store: they may belong to another store)."""
    out: dict[str, Any] = {kind: _entry(side_file(path, kind)) for kind in ("failures", "folds")}
    shards = remote.glob(f"{str(path).rstrip('/')}.failures.shard-*-of-*.json")
    if shards:
        out["failures_shards"] = [str(p) for p in shards]
    if remote.is_remote(path):
        return out
    store = Path(str(path).rstrip("/"))
    legacy = [str(store.parent / n) for n in ("failures.json", "folds.json") if (store.parent / n).is_file()]
    if legacy:
        out["legacy_shared"] = legacy
    return out


def _entry(path: remote.Target) -> dict[str, Any]:
    return {"path": str(path), "exists": remote.exists(path)}


def render_info(info: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    summary = Table(title=f"ctprep store {info['path']}", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    shape = info["shape"]
    summary.add_row("schema / fingerprint", f"{info['schema']} / {info['fingerprint']}")
    summary.add_row("volumes (patients)", f"{info['volumes']} ({info['patients']})")
    summary.add_row("written", f"{info['written']} / {info['volumes']}"
                    + (f"  [red]{len(info['not_written'])} missing[/red]" if info["not_written"] else ""))
    summary.add_row("images per volume", f"D={shape['D']} C={shape['C']} H={shape['H']} W={shape['W']} (uint8)")
    summary.add_row("windows", ", ".join(f"{w['name']} (c={w['center']:g}, w={w['width']:g})" for w in info["windows"]))
    summary.add_row("HU rules applied", ", ".join(f"{k}: {v}" for k, v in info["hu_rules"].items()) or "-")
    if info["bytes_on_disk"] is not None:
        ratio = f", compression {info['compression_ratio']:.1f}x" if info["compression_ratio"] else ""
        summary.add_row("on disk", f"{info['bytes_on_disk'] / 2**20:.1f} MiB{ratio}")
    qc = info["qc_flagged"]
    summary.add_row("QC flagged", f"[bold red]{len(qc)}[/bold red]" if qc else "0")
    for kind, what in (("failures", "failure report"), ("folds", "fold lists")):
        entry = info["side_files"][kind]
        summary.add_row(what, entry["path"] + ("" if entry["exists"] else "  (not written yet)"))
    for shard in info["side_files"].get("failures_shards", []):
        summary.add_row("shard failure report", shard)
    reports = info["failure_reports"]
    if len(reports["reports"]) > 1 or reports["unreadable"]:
        opened = len(reports["open"])
        summary.add_row("failures, all reports", (f"[red]{opened} open[/red]" if opened else "0 open")
                        + f" (merged from {len(reports['reports'])} report(s); {reports['resolved']} fixed since; "
                        "`ctprep verify` writes the merged report)"
                        + "".join(f"  [red]unreadable: {u}[/red]" for u in reports["unreadable"]))
    for old in info["side_files"].get("legacy_shared", []):
        summary.add_row("old shared file", f"{old}  [yellow](old name, shared by the folder's stores: may not be "
                        "this store's; delete it after a re-run)[/yellow]")
    console.print(summary)
    if info["not_written"]:
        console.print(f"[red]not written:[/red] {', '.join(info['not_written'][:10])}"
                      + (" ..." if len(info["not_written"]) > 10 else ""))
    for entry in qc[:10]:
        console.print(f"[bold red]QC[/bold red] {entry['volume']}: {', '.join(entry['flags'])}")
    if info["folds"] is not None:
        console.print(render_fold_table(info["folds"], info["label_names"]))
    else:
        console.print("folds: none assigned yet (run [bold]ctprep make-folds[/bold])")


def render_fold_table(table: dict[str, Any], label_names: list[str]) -> Any:
    from rich.table import Table

    out = Table(title=f"{table['k']} folds: volumes, patients and positives per label")
    out.add_column("label")
    for entry in table["folds"]:
        out.add_column(f"fold {entry['fold']}", justify="right")
    out.add_column("max-min", justify="right")
    patients = [e["patients"] for e in table["folds"]]
    out.add_row("volumes", *[str(e["volumes"]) for e in table["folds"]], str(table.get("size_spread", "")),
                style="bold")
    out.add_row("patients", *map(str, patients), str(max(patients, default=0) - min(patients, default=0)),
                style="bold")
    spread = table.get("spread", {})
    for name in label_names:
        out.add_row(name, *[str(e["positives"][name]) for e in table["folds"]], str(spread.get(name, "")))
    worst = table.get("worst_spread")
    if worst:
        met = "[green]within[/green]" if worst["spread"] <= worst["allowed"] else "[red]above[/red]"
        out.caption = (f"worst per-label spread: {worst['label']} max-min {worst['spread']} positive volumes "
                       f"(mean {worst['mean']:g} per fold; {met} the target max(2, 20 % of mean) = "
                       f"{worst['allowed']:g})")
    return out


def preview(path: str | Path, volume: str, out: Path, *, slices: int = 6, min_size: int = 160) -> Path:
    """Write a montage PNG: rows = windows, columns = evenly spaced slices of one volume."""
    import cv2

    from ctprep.naming import strip_volume_suffix

    store: CacheStore = open_store(path)
    names = [strip_volume_suffix(n) for n in store.volume_names]
    try:
        row = names.index(strip_volume_suffix(Path(volume).name))
    except ValueError:
        raise StoreError(f"{path}: no volume named '{volume}' in the store") from None
    if not store.written()[row]:
        raise StoreError(f"{path}: volume '{volume}' is not written (its build failed; see "
                         f"{side_file(path, 'failures')})")
    depth = store.image_shape[0]
    idx = np.unique(np.linspace(0, depth - 1, num=min(slices, depth)).round().astype(int))
    images = store.read_images(row, idx)  # (K, C, H, W)
    scale = max(1, int(np.ceil(min_size / max(images.shape[2:]))))
    tiles = []
    for c, window in enumerate(store.windows):
        row_tiles = []
        for k, z in enumerate(idx):
            tile = cv2.resize(images[k, c], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)
            cv2.putText(tile, f"{window['name']} z={z}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (0, 255, 255), 1, cv2.LINE_AA)
            row_tiles.append(np.pad(tile, ((1, 1), (1, 1), (0, 0))))
        tiles.append(np.concatenate(row_tiles, axis=1))
    montage = np.concatenate(tiles, axis=0)
    title = np.zeros((22, montage.shape[1], 3), dtype=np.uint8)
    cv2.putText(title, f"{store.volume_names[row]}  ({store.row_info(row).get('hu_rule', '?')})", (4, 15),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    montage = np.concatenate([title, montage], axis=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), montage):
        raise StoreError(f"cannot write {out}")
    return out
