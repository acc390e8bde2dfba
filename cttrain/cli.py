"""`cttrain` command line: parse options, call a plain function (cv, fold, baseline, predict, evaluate, report).

Every user-fixable problem (a config error, a missing store, folds that do not match, a bad
checkpoint or table) ends as one red line on stderr and exit code 2 (config and arguments) or 1
(data and runs), never a traceback: `_command` catches them in one place. It also leaves the
torchrun process group on every way out of a command (success, user error, crash, Ctrl-C).

Works as `cttrain`, `python -m cttrain` and under `torchrun --nproc_per_node N -m cttrain fold 0`
(then only rank 0 prints and writes the run's config).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ctprep.cli import StorageOpt, configure_storage

app = typer.Typer(
    name="cttrain",
    help="Train and evaluate the attention CNN on a ctprep store: k-fold CV, fold ensembles, VLM3D metrics.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Experiment YAML (sections data, model, "
                                                   "augment, loss, training, evaluation).")]
CacheOpt = Annotated[Optional[str], typer.Option("--cache", help="ctprep store to train on (sets data.cache).")]
FoldsOpt = Annotated[Optional[int], typer.Option("--folds", "-k", help="Number of folds (default: the store's, "
                                                 "from `ctprep make-folds`).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: data/runs/<config "
                                                "stem>).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (sets training.seed and folds.seed).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out with its saved config: "
                                         "finished folds are skipped, an interrupted fold continues.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value: section.key=value "
                                                     "(repeatable).")]


class Format(str, Enum):
    csv = "csv"
    vlm3d = "vlm3d"


class Checkpoint(str, Enum):
    best_auroc = "best_auroc"
    best_f1 = "best_f1"
    last = "last"


def _rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _console() -> Console:
    return Console(quiet=_rank() != 0)  # torchrun: one voice, rank 0


def _user_errors() -> dict[type[BaseException], int]:
    """User-fixable exception types -> exit code: 2 for config/arguments, 1 for data and runs
    (imported when needed, so `--help` stays fast)."""
    from ctprep.config import ConfigError
    from ctprep.folds import FoldError
    from ctprep.store import StoreError
    from cttrain.checkpoint import CheckpointError
    from cttrain.cv import CVError
    from cttrain.distributed import DistributedError
    from cttrain.evaluate import EvaluateError
    from cttrain.predict import PredictError
    from cttrain.report import ReportError
    from cttrain.thresholds import ThresholdsError
    from cttrain.trainer import TrainingError

    data_errors = (FoldError, StoreError, CVError, CheckpointError, PredictError, EvaluateError, ThresholdsError,
                   ReportError, TrainingError, DistributedError)
    return {ConfigError: 2, **dict.fromkeys(data_errors, 1)}


def _leave_process_group() -> None:
    """`distributed.shutdown()`: a rank that exits without leaving its process group leaves NCCL's
    resources (and a warning) behind. Only once torch is loaded (no group can exist before), so a
    command that never needed torch does not import it just to leave."""
    if "torch.distributed" in sys.modules:
        from cttrain import distributed

        distributed.shutdown()


def _command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command whose user errors become one red stderr line and an exit code."""

    def wrap(func: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                func(*args, **kwargs)
            except Exception as exc:
                code = next((c for t, c in _user_errors().items() if isinstance(exc, t)), None)
                if code is None:
                    raise
                Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", markup=True, highlight=False,
                                           soft_wrap=True)
                raise typer.Exit(code=code) from None
            finally:
                _leave_process_group()

        return app.command(name)(run)

    return wrap


# ---------------------------------------------------------------------------------- cv and fold


def resolve_config(config: Path | None, overrides: list[str], flags: dict[str, Any], run_dir: Path,
                   resume: bool) -> Any:
    """The run's config: YAML < --set < flags. With `resume`, RUN_DIR/config.yaml takes the YAML's
    place, and a key that --set, a flag or the YAML file sets to another value than the saved one
    (outside cv.RUNTIME_KEYS) is a ConfigError. Keys the YAML does not mention are not compared:
    the saved config also holds what the first run's flags set (data.cache, folds.k)."""
    from ctprep.config import ConfigError, read_yaml
    from cttrain.config import load_config
    from cttrain.cv import RUNTIME_KEYS, config_changes, flat_config

    saved = run_dir / "config.yaml"
    if not (resume and saved.exists()):
        return load_config(config, overrides, flags)
    cfg = load_config(saved, overrides, flags)
    changes = config_changes(load_config(saved), cfg)
    if config is not None:
        explicit = {f"{section}.{key}" for section, values in read_yaml(config).items()
                    if isinstance(values, dict) and section != "storage" for key in values} - RUNTIME_KEYS
        have, want = flat_config(cfg), flat_config(load_config(config, overrides, flags))
        changes += [f"{key}: {have[key]!r} -> {want[key]!r}" for key in sorted(explicit) if have[key] != want[key]]
    if changes:
        raise ConfigError(f"{saved}: --resume keeps the saved config, but the command changes "
                          f"{'; '.join(changes[:3])}; drop the change or use a new --out")
    return cfg


def _set_threads(device: str) -> None:
    """On CPU, size torch's thread pool: OMP_NUM_THREADS when set, else the usable cores split between
    torchrun's local ranks (each rank taking every core would oversubscribe them)."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _prepare(config: Path | None, cache: str | None, folds: int | None, out: Path | None, seed: int | None,
             resume: bool, set_: list[str] | None, storage_option: list[str] | None = None) -> tuple[Any, Path, int]:
    """Resolve (config, run directory, number of folds) shared by `cv` and `fold`. The storage
    settings (remote stores) are this process's, inherited by its folds and loader workers, and
    kept out of the run's config (`ctprep.remote`)."""
    import dataclasses

    from ctprep.config import ConfigError
    from cttrain.cv import CVError, store_fold_count

    if folds is not None and folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}")
    configure_storage(config, set_, storage_option)
    run_dir = out or Path("data") / "runs" / (config.stem if config else "default")
    flags = {"data.cache": cache, "training.seed": seed, "folds.seed": seed, "folds.k": folds}
    cfg = resolve_config(config, list(set_ or []), flags, run_dir, resume)
    k = folds if folds is not None else store_fold_count(cfg.data.cache)
    if k < 2:
        raise CVError(f"{cfg.data.cache}: the store has no folds yet; run ctprep make-folds {cfg.data.cache}")
    _set_threads(cfg.training.device)
    return dataclasses.replace(cfg, folds=dataclasses.replace(cfg.folds, k=k)), run_dir, k


def _parse_devices(text: str | None) -> list[str] | None:
    """`0,1` -> [cuda:0, cuda:1]; names such as `cpu` or `cuda:2` pass through."""
    if not text:
        return None
    return [f"cuda:{d}" if d.isdigit() else d for d in (p.strip() for p in text.split(",")) if d]


@_command("cv")
def cv_cmd(config: ConfigOpt = None, cache: CacheOpt = None, folds: FoldsOpt = None, out: OutOpt = None,
           seed: SeedOpt = None, resume: ResumeOpt = False, set_: SetOpt = None,
           devices: Annotated[Optional[str], typer.Option("--devices", help="GPUs to spread folds over, "
                                                          "e.g. 0,1 (one fold per GPU at a time).")] = None,
           storage_option: StorageOpt = None) -> None:
    """Run k-fold cross-validation, pool out-of-fold predictions, tune thresholds, write summaries."""
    from cttrain.cv import run_cv

    cfg, run_dir, k = _prepare(config, cache, folds, out, seed, resume, set_, storage_option)
    run_cv(cfg, run_dir, k=k, resume=resume, devices=_parse_devices(devices), console=_console())


@_command("fold")
def fold_cmd(fold: Annotated[int, typer.Argument(help="Validation fold index, 0..K-1.")],
             config: ConfigOpt = None, cache: CacheOpt = None, folds: FoldsOpt = None, out: OutOpt = None,
             seed: SeedOpt = None, resume: ResumeOpt = False, set_: SetOpt = None,
             storage_option: StorageOpt = None) -> None:
    """Train one fold (the unit `cv` schedules; runs under torchrun for DDP)."""
    from cttrain.cv import run_fold

    cfg, run_dir, k = _prepare(config, cache, folds, out, seed, resume, set_, storage_option)
    run_fold(cfg, run_dir, fold, k=k, resume=resume, console=_console(), write=_rank() == 0)


@_command("baseline")
def baseline_cmd(config: ConfigOpt = None, cache: CacheOpt = None, folds: FoldsOpt = None,
                 out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to write "
                                                             "results/floor_oof_predictions.csv and floor.json "
                                                             "into (optional).")] = None,
                 json_: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a "
                                                     "table.")] = False,
                 set_: SetOpt = None, storage_option: StorageOpt = None) -> None:
    """The sanity floor: a histogram/statistics model on the cached windows inside the body, same folds.

    Says when it is at chance (constant images, labels misaligned with rows); the CNN should beat it."""
    from ctprep.config import ConfigError
    from cttrain.baseline import run_floor
    from cttrain.config import load_config
    from cttrain.cv import CVError, store_fold_count
    from cttrain.floor import render_table, write_floor
    from cttrain.metrics import jsonable

    if folds is not None and folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}")
    configure_storage(config, set_, storage_option)
    cfg = load_config(config, list(set_ or []), {"data.cache": cache})
    k = folds if folds is not None else store_fold_count(cfg.data.cache)
    if k < 2:
        raise CVError(f"{cfg.data.cache}: the store has no folds yet; run ctprep make-folds {cfg.data.cache}")
    floor = run_floor(cfg.data.cache, k, channels=cfg.data.channels)
    block = write_floor(out / "results", floor) if out is not None else floor.block()
    if json_:
        positives = {name: floor.metrics["per_label"][name]["positives"] for name in floor.label_names}
        sys.stdout.write(json.dumps(jsonable({**block, "positives": positives, "folds": k}), indent=1) + "\n")
        return
    console = _console()
    console.print(render_table(floor))
    colour = "red" if block["at_chance"] else "green"
    console.print(f"[{colour}]{block['message']}[/{colour}]", soft_wrap=True)
    console.print(f"model: {block['model']} ({floor.seconds:.1f} s)", highlight=False, soft_wrap=True)
    if out is not None:
        console.print(f"[green]wrote[/green] {out / 'results'}")


# ---------------------------------------------------------------------------------- predict, evaluate, report


@_command("predict")
def predict_cmd(
    run: Annotated[Path, typer.Option("--run", help="Run directory of `cttrain cv` (its fold checkpoints).")],
    cache: Annotated[str, typer.Option("--cache", help="ctprep store to predict (labels and folds are ignored).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
    fmt: Annotated[Format, typer.Option("--format", help="csv: VolumeName + one probability per label (+ a "
                                        "`probabilities` column: raw|remapped); vlm3d: challenge submission "
                                        "JSON.")] = Format.csv,
    remap: Annotated[Optional[bool], typer.Option("--remap/--raw", help="Fold the run's tuned thresholds into "
                                                  "the probabilities (monotone, sends each threshold to 0.5) or "
                                                  "write them raw. Default: remapped for vlm3d, raw for csv.")] = None,
    checkpoint: Annotated[Optional[Checkpoint], typer.Option("--checkpoint", help="Which checkpoint of each "
                                                             "fold (default: evaluation.checkpoint).")] = None,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Average with a left-right flipped copy "
                                                "(default: evaluation.tta_flip).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Volumes per batch.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = "auto",
    storage_option: StorageOpt = None,
) -> None:
    """Predict a store with the ensemble of the run's fold models (mean probability)."""
    from cttrain.predict import predict

    configure_storage(None, None, storage_option)
    _set_threads(device)
    path = predict(run, cache, out, fmt=fmt.value, checkpoint=checkpoint.value if checkpoint else None,
                   tta_flip=tta, batch_size=batch_size, device=device, remapped=remap)
    kind = "remapped" if (remap if remap is not None else fmt == Format.vlm3d) else "raw"
    _console().print(f"[green]wrote[/green] {path} ({kind} probabilities)")


@_command("evaluate")
def evaluate_cmd(
    predictions: Annotated[Path, typer.Argument(help="Prediction CSV (VolumeName + one probability column per "
                                                "label; extra columns such as `fold` are ignored) or the VLM3D "
                                                "submission JSON of `predict --format vlm3d`.")],
    labels: Annotated[Path, typer.Option("--labels", help="Labels CSV: VolumeName + one 0/1 column per label.")],
    json_: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")] = False,
) -> None:
    """Score predictions with the VLM3D Task 2 metrics (p >= 0.5, macro over labels, CRG)."""
    from cttrain.evaluate import describe_predictions, evaluate_files, render_table
    from cttrain.metrics import jsonable

    result = evaluate_files(predictions, labels)
    if json_:
        keep = {key: result[key] for key in ("macro", "per_label", "crg", "n", "predictions")}
        sys.stdout.write(json.dumps(jsonable(keep), indent=1) + "\n")
    else:
        Console().print(describe_predictions(result), highlight=False, soft_wrap=True)
        Console().print(render_table(result))


@_command("report")
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="Run directory of `cttrain cv`.")]) -> None:
    """Plots of a run: learning curves, per-label AUROC, ROC curves."""
    from cttrain.report import make_report

    paths = make_report(run_dir)
    console = _console()
    for path in paths:
        console.print(f"[green]wrote[/green] {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
