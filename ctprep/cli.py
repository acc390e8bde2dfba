"""`ctprep` command line: a thin layer over plain functions a notebook can call too.

Every user-fixable problem (bad config, bad input, a store that cannot be used) ends as one red
line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="ctprep",
    help="Raw chest CT -> one verified zarr v3 store of windowed, CLAHE-enhanced slices, with labels and folds.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

StorePath = Annotated[str, typer.Argument(help="Path (or fsspec URL) of the zarr store, e.g. data/cache/demo.zarr.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Experiment YAML (reads its `preprocess` and `folds` sections).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value: section.key=value (repeatable).")]
StorageOpt = Annotated[Optional[list[str]], typer.Option("--storage-option", help="fsspec option for a remote store (s3://...), key=value, repeatable: endpoint_url=http://host:9000, anon=true, client_kwargs.region_name=eu-west-1. Credentials also come from AWS_* / ~/.aws as usual; none is ever written to a file.")]


def configure_storage(config: Optional[Path], overrides: Optional[list[str]], options: Optional[list[str]]) -> None:
    """This command's remote-store settings: YAML `storage` < `--set storage.*` < `--storage-option`."""
    from ctprep.remote import configure, load_storage

    configure(load_storage(config, overrides or [], options or []))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user can fix this' (imported lazily to keep start-up fast)."""
    from ctprep.config import ConfigError
    from ctprep.folds import FoldError
    from ctprep.store import StoreError

    errors: list[type[BaseException]] = [ConfigError, FoldError, StoreError, FileNotFoundError]
    try:
        from ctprep.build import BuildError

        errors.append(BuildError)
    except ImportError:  # pragma: no cover - only while the build module is absent
        pass
    return tuple(errors)


def _fail(exc: BaseException) -> None:
    err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write (plays the role of CT-RATE's dataset/).")],
    patients: Annotated[int, typer.Option(help="Number of synthetic patients.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same dataset.")] = 0,
    scale: Annotated[str, typer.Option(help="small (demo/tests) or ctrate (512x512, 200-300 slices, for benchmarks).")] = "small",
    v1_fraction: Annotated[float, typer.Option(help="Fraction of volumes stored as CT-RATE v1 raw values.")] = 0.3,
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated label names to render (default: all 18); the others stay 0.")] = None,
    anatomy: Annotated[Optional[list[Path]], typer.Option("--anatomy", help="Real chest CT (DICOM series directory or NIfTI/MHA/NRRD file) to paint the findings onto instead of synthetic anatomy; repeat for several backgrounds (patients take them in turn).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", help="Worker processes (default: up to 4; the output is the same for any number).")] = None,
) -> None:
    """Synthesize chest CT with learnable findings in the exact CT-RATE layout (synthetic or real anatomy)."""
    from ctprep.naming import LABEL_NAMES
    from ctprep.synth import SynthError, synthesize
    from ctprep.synth_real import AnatomyError

    chosen = [name.strip() for name in labels.split(",") if name.strip()] if labels else None
    unknown = [name for name in chosen or () if name not in LABEL_NAMES]
    if unknown:
        _fail(ValueError(f"--labels: unknown label '{unknown[0]}'; labels are: {', '.join(LABEL_NAMES)}"))

    if patients < 1:
        _fail(ValueError("--patients must be >= 1"))
    if scale not in ("small", "ctrate"):
        _fail(ValueError(f"--scale must be small or ctrate, got '{scale}'"))
    if workers is not None and workers < 1:
        _fail(ValueError("--workers must be >= 1"))
    try:
        summary = synthesize(out_dir, patients, seed, scale=scale, v1_fraction=v1_fraction, progress=True,
                             labels=chosen, anatomy=anatomy or None, workers=workers)
    except (SynthError, AnatomyError) as exc:
        _fail(exc)
    console.print(f"[green]wrote[/green] {summary.get('volumes', '?')} volumes of "
                  f"{summary.get('patients', patients)} patients to {out_dir}")


@app.command("build-cache")
def build_cache(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Root searched for each VolumeName (NIfTI, MHA/MHD, NRRD, DICOM series directory).")],
    labels: Annotated[Path, typer.Option("--labels", help="Labels CSV: VolumeName then one 0/1 column per label.")],
    out: Annotated[str, typer.Option("--out", help="Store to create or complete.")],
    metadata: Annotated[Optional[Path], typer.Option("--metadata", help="CT-RATE metadata CSV (XYSpacing, ZSpacing, RescaleSlope, RescaleIntercept).")] = None,
    config: ConfigOpt = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes.")] = 1,
    shard: Annotated[str, typer.Option("--shard", help="I/N: fill only rows with row % N == I (job arrays).")] = "0/1",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild from scratch (the old store stays until the new one is complete).")] = False,
    create_only: Annotated[bool, typer.Option("--create-only", help="Create (or check) the store and its rows, build nothing: run once before a job array of --shard I/N.")] = False,
    set_: SetOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Build (or resume) the store: correct HU, resample, windows, CLAHE, verified rows."""
    from ctprep.build import build_cache as run_build
    from ctprep.build import parse_shard, print_report
    from ctprep.config import load_preprocess

    try:
        cfg = load_preprocess(config, set_ or [])
        configure_storage(config, set_, storage_option)
        if workers < 1:
            raise ValueError("--workers must be >= 1")
        report = run_build(data_dir, labels, out, cfg, metadata_csv=metadata, workers=workers,
                           shard=parse_shard(shard), overwrite=overwrite, progress=True, console=console,
                           create_only=create_only)
    except (*_user_errors(), ValueError) as exc:
        _fail(exc)
    if not create_only or report.failures or report.warnings:
        print_report(report, console)  # create-only: the labels CSV's problems, which every shard will meet
    if create_only:
        console.print(f"[green]store ready[/green]: {out} ({report.rows} rows, {report.already_done} written); "
                      "now start the --shard I/N jobs", highlight=False)
    if not report.ok:
        raise typer.Exit(code=1)


@app.command("make-folds")
def make_folds_cmd(
    store: StorePath,
    folds: Annotated[Optional[int], typer.Option("--folds", "-k", help="Number of folds (default: config folds.k, else 5).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: config folds.seed, else 42).")] = None,
    config: ConfigOpt = None,
    from_file: Annotated[Optional[Path], typer.Option("--from", help="Use your own folds: a STORE.folds.json or a VolumeName,fold CSV.")] = None,
    set_: SetOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Patient-grouped multi-label stratified folds balanced in volumes; writes the store's `folds` and STORE.folds.json."""
    from ctprep.config import load_folds
    from ctprep.folds import make_folds
    from ctprep.info import render_fold_table
    from ctprep.store import open_store

    try:
        cfg = load_folds(config, set_ or [])
        configure_storage(config, set_, storage_option)
        table = make_folds(store, k=folds if folds is not None else cfg.k,
                           seed=seed if seed is not None else cfg.seed, from_file=from_file)
    except _user_errors() as exc:
        _fail(exc)
    console.print(render_fold_table(table, open_store(store).label_names))
    meta = table["meta"]
    where = f"; wrote {meta['folds_json']}" if "folds_json" in meta else ""
    console.print(f"[green]{meta['k']} patient-disjoint folds[/green] ({meta['method']}, seed {meta['seed']}){where}")


@app.command()
def info(
    store: StorePath,
    json_: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    storage_option: StorageOpt = None,
) -> None:
    """Counts, shape, windows, written/failed rows, HU rules, QC flags, the fold table and the merged shard reports."""
    import json

    from ctprep.info import render_info, store_info

    try:
        configure_storage(None, None, storage_option)
        data = store_info(store)
    except _user_errors() as exc:
        _fail(exc)
    if json_:
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
    else:
        render_info(data, console)


@app.command()
def verify(
    store: StorePath,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Reader threads.")] = 2,
    storage_option: StorageOpt = None,
) -> None:
    """Check every written row's chunk checksums; damaged rows are named and unflagged (re-run build-cache); merges the shard reports."""
    from ctprep.verify import print_verify, verify_store

    try:
        configure_storage(None, None, storage_option)
        report = verify_store(store, workers=workers)
    except _user_errors() as exc:
        _fail(exc)
    print_verify(report, console)
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def preview(
    store: StorePath,
    volume: Annotated[str, typer.Argument(help="VolumeName (with or without .nii.gz).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")],
    slices: Annotated[int, typer.Option(help="Number of evenly spaced slices (columns).")] = 6,
    storage_option: StorageOpt = None,
) -> None:
    """A montage of slices x windows, to see at a glance that HU, windowing and CLAHE are right."""
    from ctprep.info import preview as run_preview

    try:
        configure_storage(None, None, storage_option)
        path = run_preview(store, volume, out, slices=slices)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"[green]wrote[/green] {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
