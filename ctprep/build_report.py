"""build-cache's report: the failure report beside the store, and the summary a user reads.

The failure report is `<store>.failures.json` (`<store>.failures.shard-I-of-N.json` for a shard),
written atomically beside a local store or beside a remote one in its bucket (`ctprep.remote`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from ctprep.build import BuildReport


def write_failures(report: BuildReport) -> None:
    """The failure report beside the store (written atomically; an empty list means a clean run)."""
    from ctprep.remote import write_text

    if report.failures_path is None:
        return
    payload = {"store": report.store, "shard": list(report.shard), "failures": report.failures,
               "warnings": report.warnings, "qc_flagged": report.qc_flagged}
    write_text(report.failures_path, json.dumps(payload, indent=2) + "\n")


def print_report(report: BuildReport, console: Console) -> None:
    """Summary table, then warnings, QC flags (loud, yellow) and failures (red)."""
    from rich.table import Table

    from ctprep.store import store_bytes

    size = store_bytes(report.store)
    i, n = report.shard
    rate = report.written_now / report.elapsed_s if report.elapsed_s > 0 else 0.0
    summary = Table(title="build-cache", show_header=False, title_justify="left")
    for key, value in [
        ("store", report.store + (f"  (shard {i}/{n})" if n > 1 else "")),
        ("rows", str(report.rows)),
        ("written now", str(report.written_now)),
        ("already done", str(report.already_done)),
        ("failed", f"[red]{len(report.failures)}[/red]" if report.failures else "0"),
        ("qc flagged", f"[bold yellow]{len(report.qc_flagged)}[/bold yellow]" if report.qc_flagged else "0"),
        ("elapsed", f"{report.elapsed_s:.1f} s"),
        ("volumes/s", f"{rate:.2f}"),
        ("store size", f"{size / 2**20:.1f} MiB" if size is not None else "?"),
    ]:
        summary.add_row(key, value)
    console.print(summary)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    if report.qc_flagged:
        title = "[bold yellow]QC flags: these volumes are cached but look wrong (check them)[/bold yellow]"
        _print_rows(console, title,
                    [(q["volume"], str(q["row"]), ", ".join(q["flags"])) for q in report.qc_flagged],
                    ("volume", "line", "flags"), "yellow")
    if report.failures:
        _print_rows(console, f"[bold red]{len(report.failures)} failure(s)[/bold red]",
                    [(f["volume"], str(f["row"]), f["stage"], f["reason"]) for f in report.failures],
                    ("volume", "line", "stage", "reason"), "red")
    if report.failures_path is not None and (report.failures or report.qc_flagged):
        console.print(f"details: {report.failures_path}", highlight=False)


def _print_rows(console: Console, title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...],
                style: str, limit: int = 25) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", border_style=style)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows[:limit]:
        table.add_row(*row)
    if len(rows) > limit:
        table.add_row(f"... {len(rows) - limit} more", *[""] * (len(columns) - 1))
    console.print(table)
