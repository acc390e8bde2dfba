"""Challenge metrics against a plain scikit-learn reimplementation, CRG cases, and `evaluate_files`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from ctprep.naming import LABEL_NAMES
from cttrain.evaluate import (
    EvaluateError,
    evaluate_files,
    read_labels_csv,
    read_prediction_table,
    render_table,
)
from cttrain.metrics import challenge_metrics, crg, jsonable, macro_auroc, ranking_score

LABELS = list(LABEL_NAMES)


def _reference(y: np.ndarray, probs: np.ndarray) -> dict:
    """The challenge definitions written the obvious way, one scikit-learn call per label."""
    pred = (probs >= 0.5).astype(int)
    rows = {"precision": [], "recall": [], "f1": [], "accuracy": [], "auroc": []}
    for j in range(y.shape[1]):
        p, r, f, _ = precision_recall_fscore_support(y[:, j], pred[:, j], average="binary",
                                                     pos_label=1, zero_division=0)
        rows["precision"].append(p)
        rows["recall"].append(r)
        rows["f1"].append(f)
        rows["accuracy"].append(accuracy_score(y[:, j], pred[:, j]))
        rows["auroc"].append(roc_auc_score(y[:, j], probs[:, j]) if len(set(y[:, j])) == 2 else None)
    return rows


def _random_case(seed: int = 0, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < rng.uniform(0.05, 0.5, len(LABELS))).astype(int)
    y[:, 3] = 0  # a label with one class: AUROC skipped, still counted in the macro F1 etc.
    probs = np.clip(0.35 * y + rng.random(y.shape) * 0.7, 0, 1)
    probs[:5, 0] = 0.5  # exactly on the threshold: must count as positive (>=)
    return y, probs


def test_challenge_metrics_match_sklearn_reference_and_ignore_row_order():
    y, probs = _random_case()
    ref = _reference(y, probs)
    perm = np.random.default_rng(1).permutation(len(y))
    for yy, pp in ((y, probs), (y[perm], probs[perm])):
        out = challenge_metrics(yy, pp, LABELS)
        for j, label in enumerate(LABELS):
            for name in ("precision", "recall", "f1", "accuracy"):
                assert out["per_label"][label][name] == pytest.approx(ref[name][j], abs=1e-9)
        assert out["per_label"][LABELS[3]]["auroc"] is None
        assert out["auroc_skipped"] == [LABELS[3]]
        valid = [a for a in ref["auroc"] if a is not None]
        assert out["macro"]["auroc"] == pytest.approx(np.mean(valid), abs=1e-9)
        for name in ("precision", "recall", "f1", "accuracy"):  # over all 18 labels, one-class included
            assert out["macro"][name] == pytest.approx(np.mean(ref[name]), abs=1e-9)
        assert out["n"] == len(y)
        assert out["per_label"][LABELS[5]]["positives"] == int(y[:, 5].sum())
    assert macro_auroc(y, probs) == pytest.approx(out["macro"]["auroc"], abs=1e-12)


def test_threshold_is_inclusive():
    y = np.array([[1], [0]])
    out = challenge_metrics(y, np.array([[0.5], [0.4999]]), ["a"])
    assert out["per_label"]["a"]["tp"] == 1 and out["per_label"]["a"]["f1"] == 1.0


def test_crg_hand_computed_example():
    # X = 6, A = 3, TP = 2, FN = 1, FP = 1: r = 0.5, U = 1.5, s = 1 - 0.5 - 1 = -0.5, CRG = 1.5 / 3.5
    y = np.array([[1, 0], [0, 0], [1, 1]])
    pred = np.array([[1, 1], [0, 0], [0, 1]])
    assert crg(y, pred) == pytest.approx(3 / 7, abs=1e-12)
    assert challenge_metrics(y, pred.astype(float), ["a", "b"])["crg"] == pytest.approx(3 / 7, abs=1e-12)


def test_crg_limits():
    y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
    assert crg(y, y) == pytest.approx(1.0)  # perfect: s = U
    assert crg(y, np.zeros_like(y)) == pytest.approx(1 / 3)  # all negative: s = -U


def test_crg_zero_when_denominator_vanishes():
    y = np.ones((3, 2), dtype=int)  # every cell positive: U = 0, r = 0, FP = 0 -> 2U - s = 0
    assert crg(y, np.zeros_like(y)) == 0.0
    assert crg(y, y) == 0.0


def test_crg_without_positives_is_an_error():
    y = np.zeros((4, 3), dtype=int)
    with pytest.raises(ValueError, match="no positive"):
        crg(y, np.ones_like(y))
    out = challenge_metrics(y, np.full(y.shape, 0.7), ["a", "b", "c"])
    assert out["crg"] is None and math.isnan(out["macro"]["auroc"])
    assert json.loads(json.dumps(jsonable(out), allow_nan=False))["macro"]["auroc"] is None


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        challenge_metrics(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="only 0 and 1"):
        challenge_metrics(np.full((2, 1), 2), np.zeros((2, 1)), ["a"])
    with pytest.raises(ValueError, match="NaN"):
        challenge_metrics(np.zeros((2, 1)), np.full((2, 1), np.nan), ["a"])


def test_ranking_score_is_mean_of_macro():
    macro = {"auroc": 0.8, "f1": 0.4, "precision": 0.5, "recall": 0.3, "accuracy": 0.9}
    assert ranking_score(macro) == pytest.approx(0.58)


# ---------------------------------------------------------------- evaluate_files


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _tables(tmp_path: Path, n: int = 30, seed: int = 2):
    rng = np.random.default_rng(seed)
    names = [f"valid_{i}_a_1" for i in range(n)]
    y = (rng.random((n, len(LABELS))) < 0.3).astype(int)
    probs = np.round(np.clip(0.4 * y + rng.random(y.shape) * 0.6, 0, 1), 6)
    labels_csv = _write_csv(tmp_path / "labels.csv", ["VolumeName", *LABELS],
                            [[f"{name}.nii.gz", *row] for name, row in zip(names, y.tolist(), strict=True)])
    return names, y, probs, labels_csv


def test_evaluate_files_matches_shuffled_bare_names(tmp_path):
    names, y, probs, labels_csv = _tables(tmp_path)
    perm = np.random.default_rng(3).permutation(len(names))
    kept = LABELS[:-1]  # the last label column is absent: the evaluator scores it as 0.0
    header = ["VolumeName", "fold", *kept]
    rows = [[names[i], i % 3, *probs[i, :-1].tolist()] for i in perm]
    pred_csv = _write_csv(tmp_path / "pred.csv", header, rows)

    result = evaluate_files(pred_csv, labels_csv)
    expected_probs = probs.copy()
    expected_probs[:, -1] = 0.0
    expected = challenge_metrics(y, expected_probs, LABELS)
    for name in ("auroc", "f1", "precision", "recall", "accuracy"):
        assert result["macro"][name] == pytest.approx(expected["macro"][name], abs=1e-12)
    assert result["crg"] == pytest.approx(expected["crg"], abs=1e-12)
    assert result["missing_label_columns"] == [LABELS[-1]]
    assert result["per_label"][LABELS[-1]]["recall"] == 0.0

    read_names, read_probs, _ = read_prediction_table(pred_csv)
    assert read_names[0] == names[perm[0]] and read_probs.shape == (len(names), len(LABELS))
    label_names, label_y, _ = read_labels_csv(labels_csv)
    assert label_names[:2] == names[:2] and label_y.dtype == np.uint8


def test_evaluate_files_names_missing_volumes(tmp_path):
    names, _, probs, labels_csv = _tables(tmp_path)
    rows = [[name, *p] for name, p in zip(names[3:], probs[3:].tolist(), strict=True)]
    pred_csv = _write_csv(tmp_path / "pred.csv", ["VolumeName", *LABELS], rows)
    with pytest.raises(EvaluateError, match=r"3 volume\(s\) in the labels have no prediction") as info:
        evaluate_files(pred_csv, labels_csv)
    assert "valid_0_a_1" in str(info.value) and "pred.csv" in str(info.value)

    extra = _write_csv(tmp_path / "extra.csv", ["VolumeName", *LABELS],
                       [[name, *p] for name, p in zip(names, probs.tolist(), strict=True)]
                       + [["valid_99_a_1.mha", *probs[0].tolist()]])
    with pytest.raises(EvaluateError, match=r"1 volume\(s\) predicted but not in the labels.*valid_99_a_1"):
        evaluate_files(extra, labels_csv)


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        (["Name", "Cardiomegaly"], ["valid_1_a_1", "0.3"], "no 'VolumeName' column"),
        (["VolumeName", "Cardiomegaly"], ["valid_1_a_1", "abc"], r"row 2, column 'Cardiomegaly'.*not a number"),
        (["VolumeName", "Cardiomegaly"], ["valid_1_a_1", "3.2"], "not in \\[0, 1\\]"),
        (["VolumeName", "fold"], ["valid_1_a_1", "0"], "none of the 18 label columns"),
    ],
)
def test_bad_prediction_tables(tmp_path, header, row, message):
    path = _write_csv(tmp_path / "bad.csv", header, [row])
    with pytest.raises(EvaluateError, match=message):
        read_prediction_table(path)


def test_duplicate_volume_and_bad_label_value(tmp_path):
    dup = _write_csv(tmp_path / "dup.csv", ["VolumeName", "Cardiomegaly"],
                     [["valid_1_a_1.nii.gz", "0.1"], ["valid_1_a_1", "0.2"]])
    with pytest.raises(EvaluateError, match="row 3: volume 'valid_1_a_1' appears more than once"):
        read_prediction_table(dup)
    bad = _write_csv(tmp_path / "labels.csv", ["VolumeName", *LABELS], [["valid_1_a_1", 2, *[0] * 17]])
    with pytest.raises(EvaluateError, match="label must be 0 or 1"):
        read_labels_csv(bad)
    with pytest.raises(EvaluateError, match="file not found"):
        read_labels_csv(tmp_path / "nope.csv")


def _submission(path: Path, items: list) -> Path:
    path.write_text(json.dumps([{"outputs": [{"value": {"predictions": items}}]}]), encoding="utf-8")
    return path


def test_evaluate_reads_the_vlm3d_submission_json(tmp_path):
    names, y, probs, labels_csv = _tables(tmp_path)
    items = []
    for i, name in enumerate(names):
        scores = {label: float(p) for label, p in zip(LABELS, probs[i], strict=True)}
        if i % 2:
            del scores[LABELS[4]]                                # a missing key is scored as 0.0
        del scores[LABELS[-1]]                                   # absent everywhere
        items.append({"input_image_name": f"{name}.mha" if i % 3 else f"{name}.nii.gz", "probabilities": scores})
    sub = _submission(tmp_path / "sub.json", items[::-1])
    expected_probs = probs.copy()
    expected_probs[1::2, 4] = 0.0
    expected_probs[:, -1] = 0.0
    result = evaluate_files(sub, labels_csv)
    expected = challenge_metrics(y, expected_probs, LABELS)
    assert result["macro"] == expected["macro"] and result["crg"] == expected["crg"]
    assert result["missing_label_columns"] == [LABELS[-1]]
    assert result["missing_label_keys"] == {LABELS[4]: len(names) // 2}
    assert result["predictions"] == {"path": str(sub), "format": "vlm3d", "probabilities": None}
    assert "where the key is missing" in render_table(result).caption


def _wrap(items: list) -> str:
    return json.dumps([{"outputs": [{"value": {"predictions": items}}]}])


def _item(name: str, **scores) -> dict:
    return {"input_image_name": name, "probabilities": {k.replace("_", " "): v for k, v in scores.items()}}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "not readable JSON"),
        ('{"predictions": []}', r'not a VLM3D submission \(no data\[0\]\["outputs"\]'),
        (_wrap([]), "holds no predictions"),
        (_wrap([{"probabilities": {}}]), r"predictions\[0\]: no input_image_name"),
        (_wrap([_item("a.nii.gz", Cardiomegaly="high")]),
         r"predictions\[0\] \(a.nii.gz\), label 'Cardiomegaly': 'high' is not a number"),
        (_wrap([_item("a.nii.gz", x=1), _item("b.mha", x=1)]), "no prediction has any of the 18"),
        (_wrap([_item("a.nii.gz", Cardiomegaly=1), _item("a.mha", Cardiomegaly=1)]),
         r"predictions\[1\]: volume 'a' appears more than once"),
    ],
)
def test_bad_submissions_are_one_line_errors(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(payload, encoding="utf-8")
    with pytest.raises(EvaluateError, match=message) as info:
        read_prediction_table(path)
    assert "bad.json" in str(info.value) and "\n" not in str(info.value)


def test_render_table_shows_labels_and_crg(tmp_path):
    from rich.console import Console

    y, probs = _random_case()
    console = Console(record=True, width=160)
    console.print(render_table(challenge_metrics(y, probs, LABELS)))
    text = console.export_text()
    assert "Cardiomegaly" in text and "macro" in text and "CRG" in text
    assert "AUROC skipped (one class): Pericardial effusion" in text
