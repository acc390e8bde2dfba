"""`cttrain report RUN_DIR`: figures and a markdown summary of a cross-validation run.

Writes RUN_DIR/report/{roc_curves,auroc_by_label,training_curves,calibration}.png and report.md;
with a sanity floor in cv_summary.json (`cttrain/floor.py`), the per-label figure and table show it.
Every input but the run directory itself is optional: a figure whose inputs are missing or
unreadable is skipped with a note in report.md, so a half-finished run still gets a report.

matplotlib is imported inside the functions (it is an optional extra) and figures are drawn on
`matplotlib.figure.Figure` objects directly, which renders through Agg without touching pyplot's
global state.
"""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctprep.naming import LABEL_NAMES
from cttrain.evaluate import EvaluateError, match_rows, read_labels_csv, read_prediction_table
from cttrain.floor import floor_aurocs, floor_cells, floor_notes
from cttrain.metrics import MACRO_METRICS, challenge_metrics
from cttrain.report_figures import Skip as _Skip
from cttrain.report_figures import calibration_figure, training_figure
from cttrain.thresholds import ThresholdsError, load_thresholds

DPI = 120
FIGURES = ("roc_curves", "auroc_by_label", "training_curves", "calibration")
_RC = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "xtick.labelsize": 9,
       "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 12, "axes.spines.top": False,
       "axes.spines.right": False}


class ReportError(ValueError):
    """The run directory cannot be reported on (the message names the path)."""


@dataclass
class _Run:
    run_dir: Path
    labels: list[str]
    oof: dict | None = None  # {"y", "probs", "metrics"} on pooled out-of-fold predictions
    folds: dict[int, dict] = field(default_factory=dict)  # fold -> parsed fold_k.json
    logs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # fold -> column -> values
    summary: dict | None = None
    thresholds: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ loading


def _load_oof(results: Path, notes: list[str]) -> dict | None:
    pred, truth = results / "oof_predictions.csv", results / "oof_labels.csv"
    for path, what in ((pred, "out-of-fold predictions"), (truth, "their ground truth")):
        if not path.is_file():
            notes.append(f"`results/{path.name}` ({what}) not found: ROC curves, calibration and "
                         "out-of-fold metrics skipped.")
            return None
    try:
        truth_names, y, labels = read_labels_csv(truth, None)
        pred_names, probs, _ = read_prediction_table(pred, labels)
        probs = probs[match_rows(pred_names, truth_names, pred, truth)]
        return {"y": y, "probs": probs, "labels": labels, "metrics": challenge_metrics(y, probs, labels)}
    except (EvaluateError, ValueError) as exc:
        notes.append(f"Out-of-fold predictions unusable ({exc}): ROC curves and calibration skipped.")
        return None


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        data = exc
    if not isinstance(data, dict):
        notes.append(f"`{path.name}` unreadable ({data if isinstance(data, Exception) else 'not an object'}); "
                     "ignored.")
        return None
    return data


def _read_log(path: Path, notes: list[str]) -> dict[str, np.ndarray] | None:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error) as exc:
        notes.append(f"`{path}` unreadable ({exc}); ignored.")
        return None
    return {key: np.array([_number(row.get(key)) for row in rows]) for key in rows[0] if key} if rows else None


def _number(text: str | None) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan  # an empty cell: this epoch did not log the column


def _fold_index(path: Path, pattern: str) -> int | None:
    match = re.fullmatch(pattern, path.name)
    return int(match[1]) if match else None


def _load_run(run_dir: Path) -> _Run:
    results = run_dir / "results"
    notes: list[str] = []
    oof = _load_oof(results, notes)
    folds = {}
    for path in sorted(results.glob("fold_*.json")):
        k = _fold_index(path, r"fold_(\d+)\.json")
        if k is not None and (data := _read_json(path, notes)) is not None:
            folds[k] = data
    logs = {}
    for path in sorted((run_dir / "logs").glob("fold_*/metrics.csv")):
        k = _fold_index(path.parent, r"fold_(\d+)")
        if k is not None and (log := _read_log(path, notes)) is not None:
            logs[k] = log
    summary_path = results / "cv_summary.json"
    summary = _read_json(summary_path, notes) if summary_path.is_file() else None
    if summary is None:
        notes.append("`results/cv_summary.json` not found: the summary uses out-of-fold metrics only.")
    # Label names come from the OOF labels file, else from a fold's per-label metrics.
    per_label = [(d.get("metrics") or {}).get("per_label") for d in folds.values()]
    labels = oof["labels"] if oof else next((list(p) for p in per_label if isinstance(p, dict) and p),
                                            list(LABEL_NAMES))
    run = _Run(run_dir, labels, oof, folds, logs, summary, notes=notes)
    if (results / "thresholds.json").is_file():
        try:
            run.thresholds, _ = load_thresholds(results / "thresholds.json", labels)
        except ThresholdsError as exc:
            notes.append(f"Tuned thresholds not shown: {exc}")
    return run


# ------------------------------------------------------------------------------------ figures


def _rates(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(FPR, TPR) of one binary decision."""
    y = y.astype(bool)
    return float((pred & ~y).sum() / max(1, (~y).sum())), float((pred & y).sum() / max(1, y.sum()))


def _roc_figure(run: _Run):
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    if run.oof is None:
        raise _Skip("ROC curves: no usable out-of-fold predictions with labels.")
    y, probs, metrics = run.oof["y"], run.oof["probs"], run.oof["metrics"]
    ncols = min(6, len(run.labels))
    nrows = math.ceil(len(run.labels) / ncols)
    fig = Figure(figsize=(2.7 * ncols, 2.9 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for j, ax in enumerate(axes.flat):
        if j >= len(run.labels):
            ax.set_visible(False)
            continue
        stats = metrics["per_label"][run.labels[j]]
        ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
        if stats["auroc"] is None:
            ax.text(0.5, 0.5, "one class only:\nAUROC undefined", ha="center", va="center", color="0.4")
            score = "n/a"
        else:
            fpr, tpr, _ = roc_curve(y[:, j], probs[:, j])
            ax.plot(fpr, tpr, color="C0", lw=1.6, label="ROC")
            # Markers may sit on the frame (FPR 0 at p >= 0.5 is common): do not clip them away.
            ax.plot(*_rates(y[:, j], probs[:, j] >= 0.5), "o", color="C3", ms=5, clip_on=False,
                    zorder=4, label="operating point at p ≥ 0.5")
            if run.thresholds is not None:
                ax.plot(*_rates(y[:, j], probs[:, j] >= run.thresholds[j]), "s", color="C2", ms=5,
                        clip_on=False, zorder=4, label="at the tuned threshold")
            score = f"{stats['auroc']:.3f}"
        ax.set_title(f"{textwrap.fill(run.labels[j], 26)}\nAUROC {score} · {stats['positives']} pos",
                     fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
        if j % ncols == 0:
            ax.set_ylabel("true positive rate")
        if j + ncols >= len(run.labels):  # nothing below it: the bottom axis of its column
            ax.set_xlabel("false positive rate")
            ax.xaxis.set_tick_params(labelbottom=True)
    macro = metrics["macro"]["auroc"]
    fig.suptitle(f"Out-of-fold ROC curves per label ({metrics['n']} volumes, macro AUROC {macro:.3f})")
    handles, names = next((ax.get_legend_handles_labels() for ax in axes.flat if ax.get_lines()[1:]),
                          ([], []))
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=len(handles), frameon=False)
    return fig


def _auroc_figure(run: _Run):
    from matplotlib.figure import Figure

    per_fold = np.full((len(run.folds), len(run.labels)), np.nan)
    for i, data in enumerate(run.folds.values()):
        per_label = (data.get("metrics") or {}).get("per_label") or {}
        for j, label in enumerate(run.labels):
            value = (per_label.get(label) or {}).get("auroc")
            per_fold[i, j] = value if isinstance(value, (int, float)) else np.nan
    has_folds = bool(np.isfinite(per_fold).any())
    oof = np.array([np.nan if (a := run.oof["metrics"]["per_label"][label]["auroc"]) is None else a
                    for label in run.labels]) if run.oof else np.full(len(run.labels), np.nan)
    if not has_folds and not np.isfinite(oof).any():
        raise _Skip("Per-label AUROC: no `results/fold_k.json` with per-label AUROC and no OOF predictions.")
    valid = np.ma.masked_invalid(per_fold)  # a label with one class in a fold has no AUROC there
    mean, std = valid.mean(axis=0).filled(np.nan), valid.std(axis=0).filled(np.nan)
    key = np.where(np.isfinite(mean), mean, oof) if has_folds else oof
    order = np.argsort(np.where(np.isfinite(key), key, -1.0), kind="stable")
    ypos = np.arange(len(order))
    fig = Figure(figsize=(8.5, 0.34 * len(order) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    if has_folds:
        # Bars start at chance (0.5), so their length is the gain over guessing.
        ax.barh(ypos, mean[order] - 0.5, left=0.5, xerr=std[order], color="C0", alpha=0.75, capsize=3,
                error_kw={"lw": 1, "ecolor": "0.25"}, label=f"mean ± std over {len(run.folds)} folds")
        rows = np.repeat(ypos[None, :], len(per_fold), axis=0)
        ax.scatter(per_fold[:, order].ravel(), rows.ravel(), s=9, color="0.2", alpha=0.5, zorder=3,
                   label="single fold")
    if np.isfinite(oof).any():
        ax.scatter(oof[order], ypos, marker="D", s=30, color="C3", zorder=4, label="pooled out-of-fold")
    floor = floor_aurocs(run.summary, run.labels)
    if floor is not None:
        ax.scatter(floor[order], ypos, marker="|", s=220, linewidths=2.5, color="C1", zorder=5, label="sanity floor")
    ax.axvline(0.5, ls="--", lw=1, color="0.5", label="chance")
    ax.set_yticks(ypos, [run.labels[j] for j in order])
    for tick, j in zip(ax.get_yticklabels(), order, strict=True):
        if floor is not None and oof[j] <= floor[j]:  # nan compares False: no flag without both AUROCs
            tick.set_color("C3")
    low = np.nanmin(np.concatenate([per_fold.ravel(), oof, [0.5], [] if floor is None else floor]))
    ax.set_xlim(min(0.4, low - 0.03), 1.0)
    ax.set_xlabel("AUROC")
    ax.set_title("Per-label AUROC (sorted; labels with one class have no bar)")
    fig.legend(loc="outside lower center", ncols=5, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------ markdown


def _fmt(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _lookup(table: object, name: str) -> object:
    """`name` in a mapping under the spellings the CV summary may use (auroc, auroc_macro, ...)."""
    if not isinstance(table, dict):
        return None
    for key in (name, f"{name}_macro", f"macro_{name}"):
        if key in table:
            return table[key]
    return _lookup(table.get("macro"), name) if "macro" in table else None


_NAMES = {"auroc": "macro AUROC", "f1": "macro F1", "precision": "macro precision", "recall": "macro recall",
          "accuracy": "macro accuracy", "crg": "CRG", "ranking_score": "ranking score"}
_FIGURE_TEXT = {
    "roc_curves": ("ROC curves", "Out-of-fold ROC curve per label; dot: the operating point at p ≥ 0.5, "
                   "square: at the tuned threshold."),
    "auroc_by_label": ("Per-label AUROC", "Bars from chance to the fold mean, ± std over folds; grey dots: "
                       "single folds; red diamonds: pooled out-of-fold; orange ticks: the sanity floor "
                       "(`cttrain baseline`, same folds); red label names: the CNN at or below the floor."),
    "training_curves": ("Training curves", "Loss and validation metrics per epoch, one colour per fold."),
    "calibration": ("Calibration", "Reliability diagram and score distribution of the pooled out-of-fold "
                    "probabilities (all labels together)."),
}


def _summary_lines(run: _Run) -> list[str]:
    summary = run.summary or {}
    fold_stats = summary.get("metrics") if isinstance(summary.get("metrics"), dict) else {}
    oof = dict(run.oof["metrics"]["macro"], crg=run.oof["metrics"]["crg"]) if run.oof else summary.get("oof")
    if run.oof:
        oof["ranking_score"] = float(np.mean([oof[m] for m in MACRO_METRICS]))
    lines = ["| metric | mean ± std over folds | pooled out-of-fold |", "|---|---:|---:|"]
    for name, title in _NAMES.items():
        stats = _lookup(fold_stats, name)
        if isinstance(stats, dict):
            per_fold = f"{_fmt(stats.get('mean'))} ± {_fmt(stats.get('std'))}"
        else:  # older summaries carry only the human strings ("0.6458 ± 0.0234")
            per_fold = _fmt(_lookup(summary, name) if stats is None else stats)
        lines.append(f"| {title} | {per_fold} | {_fmt(_lookup(oof, name))} |")
    notes = []
    if "valid_folds" in summary:
        notes.append(f"Valid folds: {summary['valid_folds']} of {summary.get('total_folds', '?')}.")
    rules = summary.get("oof_epoch")
    if rules:  # evaluation.oof_epoch: which validation of each fold these figures are
        notes.append("Each fold's result is its last epoch's validation." if rules == ["last"] else
                     f"Fold results follow the rule(s) {', '.join(rules)}; 'best' = the epoch of highest "
                     "validation AUROC, chosen on the labels it is scored on (optimistic).")
    tuned = summary.get("oof") if isinstance(summary.get("oof"), dict) else {}
    if "f1_macro_tuned" in tuned:
        notes.append(f"With per-label thresholds ({tuned.get('threshold_method', '?')}; each fold's tuned on the "
                     f"other folds only): out-of-fold macro F1 {_fmt(tuned['f1_macro_tuned'])}, "
                     f"CRG {_fmt(tuned.get('crg_tuned'))}.")
    notes.append("Thresholded metrics use p ≥ 0.5. The ranking score is the mean of the five macro metrics "
                 "(this project's single number; the challenge ranks teams by a points system).")
    floor = floor_notes(summary, run.labels)
    return [*lines, "", " ".join(notes), *(["", " ".join(floor)] if floor else [])]


def _per_label_lines(run: _Run) -> list[str]:
    if run.oof is None:
        return []
    head, rule = "| label | positives | AUROC | F1 | precision | recall |", "|---|---:|---:|---:|---:|---:|"
    if run.thresholds is not None:
        head, rule = head + " tuned threshold |", rule + "---:|"
    floor = floor_aurocs(run.summary, run.labels)
    if floor is not None:
        head, rule = head + " floor AUROC | vs floor |", rule + "---:|---|"
    lines = ["## Per-label out-of-fold metrics (p ≥ 0.5)", "", head, rule]
    for j, label in enumerate(run.labels):
        row = run.oof["metrics"]["per_label"][label]
        cells = [str(row["positives"]), *(_fmt(row[m]) for m in ("auroc", "f1", "precision", "recall"))]
        if run.thresholds is not None:
            cells.append(f"{run.thresholds[j]:.3f}")
        if floor is not None:
            cells += floor_cells(row["auroc"], floor[j])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _write_markdown(run: _Run, written: dict[str, Path], path: Path) -> Path:
    lines = [f"# Report: `{run.run_dir.name}`", "", "## Summary", "", *_summary_lines(run), "",
             *_per_label_lines(run), "## Figures", ""]
    for name, png in written.items():
        title, caption = _FIGURE_TEXT[name]
        lines += [f"### {title}", "", caption, "", f"![{title}]({png.name})", ""]
    if run.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in run.notes), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def make_report(run_dir: Path | str) -> list[Path]:
    """Write RUN_DIR/report/*.png and RUN_DIR/report/report.md; returns the written paths."""
    import matplotlib

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: run directory not found")
    if not (run_dir / "results").is_dir() and not (run_dir / "logs").is_dir():
        raise ReportError(f"{run_dir}: no results/ or logs/ folder; is this a cttrain run directory?")
    run = _load_run(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    builders = {"roc_curves": _roc_figure, "auroc_by_label": _auroc_figure,
                "training_curves": training_figure, "calibration": calibration_figure}
    written: dict[str, Path] = {}
    with matplotlib.rc_context(_RC):
        for name, build in builders.items():
            png = out / f"{name}.png"
            try:
                fig = build(run)
            except _Skip as skip:
                run.notes.append(str(skip))
                png.unlink(missing_ok=True)  # a stale figure from an earlier report would mislead
                continue
            fig.savefig(png, dpi=DPI)
            written[name] = png
    return [*written.values(), _write_markdown(run, written, out / "report.md")]
