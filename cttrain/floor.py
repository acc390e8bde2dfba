"""The floor's verdict and its place in a run: is the floor at chance, where does the CNN not beat it.

Rule for "at chance" (`verdict`), so a broken pipeline is named before any GPU time is spent:

- the images carry no information: every volume's images are one grey level, or every feature is
  the same for all volumes (std across volumes < 1e-9) -- the original pipeline's rescaled-twice
  bug; or
- the floor's pooled out-of-fold macro AUROC is below 0.5 + max(0.05, 3·σ0), where σ0 is the
  standard deviation of the macro AUROC of random scores on these label counts (Mann-Whitney null:
  Var(AUROC) = (n0 + n1 + 1) / (12·n0·n1) per label, labels taken as independent). The band
  widens only where few labels or volumes make a random macro AUROC wander: 0.55 on 18 labels
  from 92 volumes up, 0.57 on 3 labels of 235 volumes, 0.78 on one 20/20 label.
  Pooled OOF AUROC of an uninformative model is often *below* 0.5 (each fold predicts the
  prevalence of the other folds), so "below the band" covers that too.

Run directory: `write_floor` leaves results/floor_oof_predictions.csv (the oof_predictions.csv
shape) and results/floor.json (the `floor` block of cv_summary.json); `summarize` reads the block
back with `load_floor` (None for runs made before the floor existed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rich.table import Table

    from cttrain.baseline import Floor

MIN_MARGIN = 0.05
Z_MARGIN = 3.0
RULE = (f"at chance when every volume's features are identical (constant images), or when the macro AUROC "
        f"< 0.5 + max({MIN_MARGIN}, {Z_MARGIN:g}·σ0), σ0 = std of a random score's macro AUROC on these label counts")
FLOOR_JSON = "floor.json"
FLOOR_CSV = "floor_oof_predictions.csv"


def chance_margin(labels: np.ndarray) -> float:
    """How far above 0.5 a macro AUROC must be to be told apart from random scores (see module doc)."""
    y = np.asarray(labels).astype(bool)
    n1 = y.sum(axis=0).astype(np.float64)
    n0 = len(y) - n1
    both = (n1 > 0) & (n0 > 0)
    if not both.any():
        return MIN_MARGIN
    var = (n0[both] + n1[both] + 1) / (12 * n0[both] * n1[both])
    return max(MIN_MARGIN, Z_MARGIN * math.sqrt(var.sum()) / both.sum())


def verdict(floor: Floor) -> dict[str, Any]:
    """{"at_chance": bool | None (no label with both classes), "message": one line, "rule": RULE}."""
    n, macro = len(floor.volume_names), floor.auroc_macro
    constant = f"; {floor.constant_volumes} of {n} volumes are constant images" if floor.constant_volumes else ""
    score = "n/a" if macro is None else f"{macro:.2f}"
    if n and (floor.constant_volumes == n or floor.feature_spread < 1e-9):
        what = ("every volume's images are one grey level" if floor.constant_volumes == n else
                "every volume has the same features")
        message = (f"floor macro AUROC {score}: at chance -- {what}: the images carry no information "
                   "(rescaled twice? written empty?)")
        return {"at_chance": True, "message": message, "rule": RULE}
    if macro is None:
        return {"at_chance": None, "message": f"floor macro AUROC n/a: no label has both classes{constant}",
                "rule": RULE}
    bound = 0.5 + chance_margin(floor.labels)
    if macro < bound:
        message = (f"floor macro AUROC {score}: at chance (below {bound:.2f}) -- images may be constant or labels "
                   f"misaligned with rows{constant}")
        return {"at_chance": True, "message": message, "rule": RULE}
    message = f"floor macro AUROC {score}: above chance (>= {bound:.2f}); the CNN should beat it{constant}"
    return {"at_chance": False, "message": message, "rule": RULE}


# ---------------------------------------------------------------------------------- run directory


def write_floor(results: str | Path, floor: Floor) -> dict:
    """results/floor_oof_predictions.csv and results/floor.json; returns the block."""
    from cttrain.cv import OOF, write_json, write_predictions

    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    write_predictions(results / FLOOR_CSV, OOF(floor.volume_names, floor.folds, floor.label_names, floor.probs,
                                               floor.labels))
    block = floor.block()
    write_json(results / FLOOR_JSON, block)
    return block


def load_floor(results: str | Path) -> dict | None:
    """The floor block of a run, None when the run has none (made before the floor) or it is unreadable."""
    try:
        block = json.loads((Path(results) / FLOOR_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return block if isinstance(block, dict) and isinstance(block.get("per_label"), dict) else None


def below_floor(per_label: dict[str, dict], floor: dict | None) -> list[str] | None:
    """Labels whose pooled OOF AUROC (challenge_metrics' per_label) is <= the floor's; None without a
    floor. A label without an AUROC on either side (one class) is not compared."""
    if floor is None:
        return None
    out = []
    for label, stats in per_label.items():
        cnn, base = stats.get("auroc"), floor["per_label"].get(label)
        if cnn is not None and base is not None and cnn <= base:
            out.append(label)
    return out


# ---------------------------------------------------------------------------------- what users see


def floor_lines(detailed: dict) -> list[str]:
    """Rich-markup lines for the end of `cttrain cv`: the floor's verdict and every label below it
    (with both AUROCs); [] when the run has no floor."""
    floor, below = detailed.get("floor"), detailed.get("below_floor")
    if not floor:
        return []
    colour = "red" if floor.get("at_chance") else "green"
    lines = [f"[{colour}]{floor.get('message')}[/{colour}]"]
    cnn = (detailed.get("oof") or {}).get("per_label") or {}
    if below:
        pairs = ", ".join(f"{label} (CNN {cnn[label]['auroc']:.3f} <= floor {floor['per_label'][label]:.3f})"
                          for label in below)
        lines.append(f"[yellow]CNN below the floor on {len(below)} label(s): {pairs}[/yellow]")
    elif below is not None:
        lines.append("[green]CNN above the floor on every label with an AUROC[/green]")
    return lines


def render_table(floor: Floor) -> Table:
    """label | positives | floor AUROC, then the macro row (`cttrain baseline`)."""
    from rich.table import Table

    table = Table(title=f"Sanity floor: {len(floor.volume_names)} volumes, out-of-fold on "
                        f"{len(np.unique(floor.folds))} folds")
    table.add_column("label")
    table.add_column("positives", justify="right")
    table.add_column("floor AUROC", justify="right")
    for name in floor.label_names:
        auroc = floor.per_label[name]
        table.add_row(name, str(floor.metrics["per_label"][name]["positives"]),
                      "n/a (one class)" if auroc is None else f"{auroc:.3f}")
    macro = floor.auroc_macro
    table.add_section()
    table.add_row("macro", "", "n/a" if macro is None else f"{macro:.3f}", style="bold")
    return table


def floor_cells(cnn: float | None, floor: float) -> list[str]:
    """The report table's `floor AUROC` and `vs floor` cells of one label."""
    if math.isnan(floor):
        return ["n/a", ""]
    flag = "" if cnn is None else ("**below floor**" if cnn <= floor else "above")
    return [f"{floor:.4f}", flag]


def floor_notes(summary: dict | None, labels: list[str]) -> list[str]:
    """The report summary's sentences on the floor: its macro AUROC, verdict, and the labels below it."""
    floor, below = (summary or {}).get("floor"), (summary or {}).get("below_floor")
    if not isinstance(floor, dict):
        return ["No sanity floor in this run (made before `cttrain baseline` existed)."] if summary else []
    compared = sum(floor.get("per_label", {}).get(label) is not None for label in labels)
    notes = [f"Sanity floor, pooled out-of-fold on the same folds ({floor.get('model')}): {floor.get('message')}."]
    if below:
        notes.append(f"**The CNN is below the floor on {len(below)} of {compared} labels**: {', '.join(below)}.")
    elif below is not None:
        notes.append(f"The CNN is above the floor on all {compared} labels with a floor AUROC.")
    return notes


def floor_aurocs(summary: dict | None, labels: list[str]) -> np.ndarray | None:
    """Floor AUROC per label (nan where undefined) from a cv_summary.json; None without a floor (report)."""
    floor = (summary or {}).get("floor")
    if not isinstance(floor, dict) or not isinstance(floor.get("per_label"), dict):
        return None
    values = [floor["per_label"].get(label) for label in labels]
    return np.array([v if isinstance(v, (int, float)) else np.nan for v in values], dtype=np.float64)


__all__ = ["RULE", "below_floor", "chance_margin", "floor_aurocs", "floor_cells", "floor_lines", "floor_notes",
           "load_floor", "render_table", "verdict", "write_floor"]
