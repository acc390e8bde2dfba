"""Score predictions against a CT-RATE labels CSV the way the VLM3D Task 2 evaluator does.

Predictions are a CSV (VolumeName + one probability column per label) or the VLM3D submission JSON
that `cttrain predict --format vlm3d` writes and the challenge scores, read as the official code
(forithmus/VLM3D-Dockers, abnclass_evaluation/json_to_csv.py) reads it:
`data[0]["outputs"][0]["value"]["predictions"]`, each `{input_image_name, probabilities}`.

Rows are matched by the evaluator's case id (`ctprep.naming.case_id`: `valid_1_a_1.nii.gz`,
`valid_1_a_1.mha` and `valid_1_a_1` are one volume), in any order. A label column (or JSON key)
missing from the predictions counts as probability 0.0, as in the evaluator. Everything else that is
wrong (a missing VolumeName column, an unparsable number, a duplicated or unmatched volume) is an
`EvaluateError` whose one-line message names the file, row, column or volume.

Which probabilities a file holds matters at the fixed threshold 0.5: `raw` (the model's) or
`remapped` (tuned thresholds folded in). `cttrain predict` records it (a `probabilities` column in
the CSV, `data[0]["cttrain"]["probabilities"]` in the JSON) and `evaluate` reports it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctprep.naming import LABEL_NAMES, case_id
from cttrain.metrics import challenge_metrics

if TYPE_CHECKING:
    from rich.table import Table

NAME_COLUMN = "VolumeName"
KIND_COLUMN = "probabilities"          # raw | remapped, written by `cttrain predict --format csv`
KINDS = ("raw", "remapped")
_SHOW = 5  # how many offending names an error message lists


@dataclass
class Predictions:
    """A prediction file, read: case ids, probabilities (N, L) in label order, and what it holds."""

    names: list[str]
    probs: np.ndarray
    label_names: list[str]
    missing: list[str]                 # labels absent from every prediction (scored 0.0)
    format: str                        # csv | vlm3d
    kind: str | None                   # raw | remapped | None when the file does not say
    partial: dict[str, int] | None = None  # JSON: label -> predictions lacking that key (scored 0.0)


class EvaluateError(ValueError):
    """Bad prediction or label table; the message names the file, row, column or volume."""


def _read_rows(path: str | Path) -> tuple[Path, list[str], list[list[str]]]:
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise EvaluateError(f"{path}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvaluateError(f"{path}: not a readable CSV ({exc})") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise EvaluateError(f"{path}: empty file (expected a header row starting with {NAME_COLUMN})")
    header = [cell.strip() for cell in rows[0]]
    if NAME_COLUMN not in header:
        raise EvaluateError(f"{path}: no {NAME_COLUMN!r} column in the header {header[:4]}...")
    if len(rows) == 1:
        raise EvaluateError(f"{path}: header only, no volumes")
    # Short rows are padded so a missing cell is reported as an empty value of a named column.
    return path, header, [row + [""] * (len(header) - len(row)) for row in rows[1:]]


def _case_ids(path: Path, raw_names: list[str], where: str = "row {}", first: int = 2,
              field: str = NAME_COLUMN) -> list[str]:
    names = [case_id(name.strip()) for name in raw_names]
    seen: set[str] = set()
    for row, name in enumerate(names, start=first):
        if not name:
            raise EvaluateError(f"{path}: {where.format(row)}: empty {field}")
        if name in seen:
            raise EvaluateError(f"{path}: {where.format(row)}: volume {name!r} appears more than once")
        seen.add(name)
    return names


def _column(path: Path, header: list[str], rows: list[list[str]], label: str, binary: bool) -> np.ndarray:
    index = header.index(label)
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        text = row[index].strip()
        try:
            value = float(text)
        except ValueError:
            raise EvaluateError(f"{path}: row {i + 2}, column {label!r}: {text!r} is not a number") from None
        if binary and value not in (0.0, 1.0):
            raise EvaluateError(f"{path}: row {i + 2}, column {label!r}: label must be 0 or 1, got {text!r}")
        if not binary and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise EvaluateError(f"{path}: row {i + 2}, column {label!r}: probability {text!r} is not in "
                                "[0, 1] (logits instead of probabilities?)")
        out[i] = value
    return out


def read_predictions(path: str | Path, label_names: Sequence[str] = LABEL_NAMES) -> Predictions:
    """Read a prediction CSV or (by its `.json` suffix) a VLM3D submission JSON."""
    if Path(path).suffix.lower() == ".json":
        return _read_submission(Path(path), list(label_names))
    path, header, rows = _read_rows(path)
    labels = list(label_names)
    missing = [label for label in labels if label not in header]
    if len(missing) == len(labels):
        raise EvaluateError(f"{path}: none of the {len(labels)} label columns is present "
                            f"(expected columns named like {labels[0]!r})")
    names = _case_ids(path, [row[header.index(NAME_COLUMN)] for row in rows])
    probs = np.zeros((len(rows), len(labels)))
    for j, label in enumerate(labels):
        if label not in missing:
            probs[:, j] = _column(path, header, rows, label, binary=False)
    return Predictions(names, probs, labels, missing, "csv", _csv_kind(path, header, rows))


def _csv_kind(path: Path, header: list[str], rows: list[list[str]]) -> str | None:
    if KIND_COLUMN not in header:
        return None
    index = header.index(KIND_COLUMN)
    kinds = {row[index].strip() for row in rows}
    bad = next((i for i, row in enumerate(rows, start=2) if row[index].strip() not in KINDS), None)
    if bad is not None:
        raise EvaluateError(f"{path}: row {bad}, column {KIND_COLUMN!r}: {rows[bad - 2][index]!r} is not one of "
                            f"{', '.join(KINDS)}")
    if len(kinds) > 1:
        raise EvaluateError(f"{path}: column {KIND_COLUMN!r} mixes raw and remapped rows")
    return kinds.pop()


def _read_submission(path: Path, labels: list[str]) -> Predictions:
    """The VLM3D submission JSON, read as the official evaluator reads it (see the module docstring)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise EvaluateError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluateError(f"{path}: not readable JSON ({exc})") from None
    try:
        items = data[0]["outputs"][0]["value"]["predictions"]
    except (KeyError, IndexError, TypeError):
        raise EvaluateError(f'{path}: not a VLM3D submission (no data[0]["outputs"][0]["value"]["predictions"])'
                            ) from None
    if not isinstance(items, list) or not items:
        raise EvaluateError(f"{path}: the submission holds no predictions")
    raw_names, probs, absent = [], np.zeros((len(items), len(labels))), dict.fromkeys(labels, 0)
    for i, item in enumerate(items):
        name, scores = _submission_item(path, i, item)
        raw_names.append(name)
        for j, label in enumerate(labels):
            if label not in scores:
                absent[label] += 1
                continue
            probs[i, j] = _probability(scores[label], f"{path}: predictions[{i}] ({name}), label {label!r}")
    names = _case_ids(path, raw_names, where="predictions[{}]", first=0, field="input_image_name")
    missing = [label for label, n in absent.items() if n == len(items)]
    if len(missing) == len(labels):
        raise EvaluateError(f"{path}: no prediction has any of the {len(labels)} label keys "
                            f"(expected keys named like {labels[0]!r})")
    partial = {label: n for label, n in absent.items() if 0 < n < len(items)}
    meta = data[0].get("cttrain") if isinstance(data[0], dict) else None
    kind = meta.get("probabilities") if isinstance(meta, dict) else None
    return Predictions(names, probs, labels, missing, "vlm3d", kind if kind in KINDS else None, partial)


def _submission_item(path: Path, i: int, item: Any) -> tuple[str, dict]:
    if not isinstance(item, dict):
        raise EvaluateError(f"{path}: predictions[{i}] is not an object")
    name, scores = item.get("input_image_name"), item.get("probabilities")
    if not isinstance(name, str):
        raise EvaluateError(f"{path}: predictions[{i}]: no input_image_name")
    if not isinstance(scores, dict):
        raise EvaluateError(f"{path}: predictions[{i}] ({name}): no probabilities object")
    return name, scores


def _probability(value: Any, where: str) -> float:
    """float(value) as the evaluator does; a value that is not a probability is an error here."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise EvaluateError(f"{where}: {value!r} is not a number") from None
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise EvaluateError(f"{where}: probability {value!r} is not in [0, 1] (logits instead of probabilities?)")
    return p


def read_prediction_table(path: str | Path, label_names: Sequence[str] = LABEL_NAMES
                          ) -> tuple[list[str], np.ndarray, list[str]]:
    """Read a prediction CSV: VolumeName, then one probability column per label named exactly as the
    label; other columns (such as `fold`) are ignored and a missing label column reads as 0.0.

    Returns (case ids, probabilities (N, L) in `label_names` order, label names).
    """
    table = read_predictions(path, label_names)
    return table.names, table.probs, table.label_names


def read_labels_csv(path: str | Path, label_names: Sequence[str] | None = LABEL_NAMES
                    ) -> tuple[list[str], np.ndarray, list[str]]:
    """Read the CT-RATE labels CSV (VolumeName + one 0/1 column per label).

    `label_names=None` takes every column but VolumeName (and a `fold` column) as a label, in file
    order. Returns (case ids, labels (N, L) as uint8 in label order, label names).
    """
    path, header, rows = _read_rows(path)
    if label_names is None:
        label_names = [name for name in header if name not in (NAME_COLUMN, "fold")]
        if not label_names:
            raise EvaluateError(f"{path}: no label columns besides {NAME_COLUMN}")
    labels = list(label_names)
    missing = [label for label in labels if label not in header]
    if missing:
        raise EvaluateError(f"{path}: missing label column(s) {missing[:_SHOW]}"
                            + (f" and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""))
    names = _case_ids(path, [row[header.index(NAME_COLUMN)] for row in rows])
    y = np.stack([_column(path, header, rows, label, binary=True) for label in labels], axis=1)
    return names, y.astype(np.uint8), labels


def _unmatched_message(kind: str, names: list[str], source: Path) -> str:
    shown = ", ".join(names[:_SHOW]) + (", ..." if len(names) > _SHOW else "")
    return f"{len(names)} volume(s) {kind} {source}: {shown}"


def match_rows(pred_names: Sequence[str], label_rows: Sequence[str],
               predictions_csv: Path | str = "predictions", labels_csv: Path | str = "labels") -> np.ndarray:
    """For each labelled volume, the index of its prediction row; every volume must be on both sides."""
    where = {name: i for i, name in enumerate(pred_names)}
    no_prediction = [name for name in label_rows if name not in where]
    if no_prediction:
        raise EvaluateError(_unmatched_message("in the labels have no prediction in", no_prediction,
                                               Path(predictions_csv)))
    labelled = set(label_rows)
    no_label = [name for name in pred_names if name not in labelled]
    if no_label:
        raise EvaluateError(_unmatched_message("predicted but not in the labels", no_label, Path(labels_csv)))
    return np.array([where[name] for name in label_rows], dtype=np.int64)


def evaluate_files(predictions_csv: str | Path, labels_csv: str | Path, threshold: float = 0.5,
                   label_names: Sequence[str] = LABEL_NAMES) -> dict:
    """VLM3D Task 2 metrics of a prediction CSV or submission JSON against a labels CSV (see
    `challenge_metrics`).

    The result also carries `missing_label_columns` (labels absent from the predictions and so
    scored as probability 0.0), `missing_label_keys` (JSON: label -> predictions lacking it) and
    `predictions` (path, format, and which probabilities the file says it holds)."""
    table = read_predictions(predictions_csv, label_names)
    truth_names, y, _ = read_labels_csv(labels_csv, table.label_names)
    order = match_rows(table.names, truth_names, predictions_csv, labels_csv)
    result = challenge_metrics(y, table.probs[order], table.label_names, threshold=threshold)
    result["missing_label_columns"] = table.missing
    result["missing_label_keys"] = table.partial or {}
    result["predictions"] = {"path": str(predictions_csv), "format": table.format, "probabilities": table.kind}
    return result


def describe_predictions(result: dict) -> str:
    """One line saying what was scored: the file, its format and which probabilities it holds."""
    info = result.get("predictions") or {}
    what = {"vlm3d": "VLM3D submission JSON", "csv": "prediction CSV"}.get(info.get("format"), "predictions")
    kind = {"raw": "raw probabilities (no threshold remap)",
            "remapped": "threshold-remapped probabilities (tuned thresholds folded in at 0.5)"}.get(
        info.get("probabilities"), "probabilities of an unrecorded kind (the file does not say raw or remapped)")
    return f"{info.get('path', '?')}: {what}, {kind}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def render_table(result: dict) -> Table:
    """A rich Table of per-label and macro metrics, with CRG and the skipped labels in the caption."""
    from rich.table import Table

    columns = ("auroc", "f1", "precision", "recall", "accuracy")
    table = Table(title=f"VLM3D Task 2 metrics ({result.get('n', '?')} volumes, threshold "
                        f"p >= {result.get('threshold', 0.5):g})")
    table.add_column("label")
    for name in columns:
        table.add_column(name.upper() if name in ("auroc", "f1") else name, justify="right")
    table.add_column("positives", justify="right")
    for label, row in result["per_label"].items():
        table.add_row(label, *(_fmt(row.get(name)) for name in columns), str(row.get("positives", "")))
    macro = result["macro"]
    table.add_section()
    table.add_row("[bold]macro[/bold]", *(f"[bold]{_fmt(macro.get(name))}[/bold]" for name in columns), "")
    notes = [f"CRG {_fmt(result.get('crg'))}"]
    if result.get("auroc_skipped"):
        notes.append("AUROC skipped (one class): " + ", ".join(result["auroc_skipped"]))
    if result.get("missing_label_columns"):
        notes.append("scored as 0.0 (column missing): " + ", ".join(result["missing_label_columns"]))
    if result.get("missing_label_keys"):
        notes.append("scored as 0.0 where the key is missing: "
                     + ", ".join(f"{k} ({n}x)" for k, n in result["missing_label_keys"].items()))
    table.caption = " · ".join(notes)
    return table
