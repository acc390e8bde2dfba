"""build-cache with bad input: every failure kind is named with its reason, good volumes are cached,
the store's failure report (`<store>.failures.json`) records it all, the exit code says so, and
nothing prints a traceback."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_build import REPO, ctrate_path, label_values, small_cfg, write_labels, write_volume

from ctprep.build import build_cache
from ctprep.store import open_store

GOOD = ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]


def _bad_dataset(root: Path) -> tuple[Path, Path, Path]:
    data = root / "data"
    for i, name in enumerate(GOOD):
        write_volume(ctrate_path(data, name), i)
    trunc = write_volume(ctrate_path(data, "train_5_a_1.nii.gz"), 5)
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    empty = ctrate_path(data, "train_6_a_1.nii.gz")
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    (data / "train_7_a_1.mha").write_text("this is not an image\n", encoding="utf-8")
    write_volume(ctrate_path(data, "train_8_a_1.nii.gz"), 8)          # its metadata row is malformed
    write_volume(root / "outside.nii.gz", 9)
    (data / "train_9_a_1.nii.gz").symlink_to(root / "outside.nii.gz")
    rows = [(n, label_values(i)) for i, n in enumerate(GOOD)]
    rows += [("train_4_a_1.nii.gz", label_values(4)),                  # no file at all
             ("train_5_a_1.nii.gz", label_values(5)),                  # truncated
             ("train_6_a_1.nii.gz", label_values(6)),                  # empty
             ("train_7_a_1.nii.gz", label_values(7)),                  # not an image (x.mha)
             ("train_8_a_1.nii.gz", label_values(8)),
             ("train_9_a_1.nii.gz", label_values(9)),                  # symlink out of data dir
             ("../outside.nii.gz", label_values(10))]                  # name escapes data dir
    for i, bad in enumerate(["yes", "2", "", "nan"]):                  # malformed labels: no store row
        values = label_values(20 + i)
        values[3] = bad
        rows.append((f"train_2{i}_a_1.nii.gz", values))
    rows.append((GOOD[0], label_values(0)))                            # same labels: warning
    rows.append((GOOD[1].replace(".nii.gz", ".mha"), [1 - v for v in label_values(1)]))  # conflicting
    labels = write_labels(root / "labels.csv", rows)
    meta = root / "meta.csv"
    with open(meta, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["VolumeName", "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope"])
        w.writerow([GOOD[0], "[1.5, 1.5]", "3.0", "-1024", "1"])
        w.writerow(["train_8_a_1.nii.gz", "[0.75; abc]", "3.0", "-1024", "1"])
    return data, labels, meta


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    data, labels, meta = _bad_dataset(root)
    report = build_cache(data, labels, root / "cache" / "s.zarr", small_cfg(), metadata_csv=meta, progress=False)
    return root, data, labels, meta, report


def _by_volume(report) -> dict[str, dict]:
    return {f["volume"]: f for f in report.failures}


def test_every_failure_kind_is_named_with_its_reason(bad_build):
    report = bad_build[4]
    fails = _by_volume(report)
    expect = {
        "train_4_a_1.nii.gz": ("find", "no file for 'train_4_a_1.nii.gz'"),
        "train_5_a_1.nii.gz": ("read", "train_5_a_1.nii.gz"),
        "train_6_a_1.nii.gz": ("read", "train_6_a_1.nii.gz"),
        "train_7_a_1.nii.gz": ("read", "train_7_a_1.mha"),
        "train_8_a_1.nii.gz": ("metadata", "line 3, column 'XYSpacing': '[0.75; abc]'"),
        "train_9_a_1.nii.gz": ("find", "is a symlink to"),
        "../outside.nii.gz": ("find", "resolves outside --data-dir"),
        "train_20_a_1.nii.gz": ("labels", "line 12, column 'Pericardial effusion': 'yes' is not 0 or 1"),
        "train_21_a_1.nii.gz": ("labels", "line 13, column 'Pericardial effusion': '2' is not 0 or 1"),
        "train_22_a_1.nii.gz": ("labels", "line 14, column 'Pericardial effusion': '' is not 0 or 1"),
        "train_23_a_1.nii.gz": ("labels", "line 15, column 'Pericardial effusion': 'nan' is not 0 or 1"),
        "train_2_a_1.mha": ("labels", "line 17: duplicate of line 3 ('train_2_a_1.nii.gz')"),
    }
    assert set(fails) == set(expect)
    for volume, (stage, text) in expect.items():
        assert fails[volume]["stage"] == stage, (volume, fails[volume])
        assert text in fails[volume]["reason"], (volume, fails[volume])
    assert "outside --data-dir" in fails["train_9_a_1.nii.gz"]["reason"]
    assert "the labels differ" in fails["train_2_a_1.mha"]["reason"]
    assert any("line 16: duplicate of line 2" in w for w in report.warnings)
    for f in report.failures:
        assert "Traceback" not in f["reason"] and "\n" not in f["reason"]
    assert not report.ok


def test_good_volumes_are_cached_and_bad_rows_stay_unwritten(bad_build):
    root, *_rest, report = bad_build
    store = open_store(root / "cache" / "s.zarr")
    names = store.volume_names
    assert names == [*GOOD, "train_4_a_1.nii.gz", "train_5_a_1.nii.gz", "train_6_a_1.nii.gz",
                     "train_7_a_1.nii.gz", "train_8_a_1.nii.gz", "train_9_a_1.nii.gz", "../outside.nii.gz"]
    written = dict(zip(names, store.written(), strict=True))
    assert [n for n, w in written.items() if w] == GOOD
    assert report.written_now == 3 and report.rows == 10
    assert store.labels()[:3].tolist() == [label_values(i) for i in range(3)]
    assert store.read_images(0).std() > 5


def test_failure_report_beside_the_store_named_after_it(bad_build):
    root, *_rest, report = bad_build
    saved = json.loads((root / "cache" / "s.zarr.failures.json").read_text(encoding="utf-8"))
    assert report.failures_path == root / "cache" / "s.zarr.failures.json"
    assert saved["store"] == str(root / "cache" / "s.zarr")
    assert saved["failures"] == report.failures and saved["warnings"] == report.warnings
    assert saved["qc_flagged"] == []
    assert {tuple(sorted(f)) for f in saved["failures"]} == {("reason", "row", "stage", "volume")}


def test_rerun_retries_only_the_failed_rows(bad_build):
    root, data, labels, meta, _ = bad_build
    write_volume(ctrate_path(data, "train_4_a_1.nii.gz"), 4)          # the missing file appears
    report = build_cache(data, labels, root / "cache" / "s.zarr", small_cfg(), metadata_csv=meta, progress=False)
    assert report.already_done == 3 and report.written_now == 1
    assert "train_4_a_1.nii.gz" not in _by_volume(report)


def test_cli_exits_nonzero_without_traceback(bad_build, tmp_path):
    from typer.testing import CliRunner

    from ctprep.cli import app

    _root, data, labels, meta, _ = bad_build
    result = CliRunner().invoke(app, ["build-cache", "--data-dir", str(data), "--labels", str(labels),
                                      "--metadata", str(meta), "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "failure(s)" in result.output
    assert "resolves outside" in result.output
    bad = CliRunner().invoke(app, ["build-cache", "--data-dir", str(data), "--labels", str(tmp_path / "none.csv"),
                                   "--out", str(tmp_path / "t.zarr")])
    assert bad.exit_code == 2 and "none.csv does not exist" in bad.output and "Traceback" not in bad.output


def test_constant_volume_is_cached_but_flagged_loudly(tmp_path):
    from rich.console import Console

    from ctprep.build import print_report

    data = tmp_path / "data"
    write_volume(data / "good.nii.gz", 1)
    write_volume(data / "flat.nii.gz", 2, constant=True)
    labels = write_labels(tmp_path / "l.csv", [("good.nii.gz", label_values(0)), ("flat.nii.gz", label_values(1))])
    report = build_cache(data, labels, tmp_path / "s.zarr", small_cfg(), progress=False)
    assert report.ok and report.written_now == 2                      # QC flags do not fail the run
    [flagged] = report.qc_flagged
    assert flagged["volume"] == "flat.nii.gz" and flagged["flags"]
    assert open_store(tmp_path / "s.zarr").written().all()
    saved = json.loads((tmp_path / "s.zarr.failures.json").read_text(encoding="utf-8"))
    assert saved["qc_flagged"] == report.qc_flagged
    console = Console(record=True, width=200, file=io.StringIO())
    print_report(report, console)
    assert "QC flags" in console.export_text()
    again = build_cache(data, labels, tmp_path / "s.zarr", small_cfg(), progress=False)
    assert again.written_now == 0 and again.qc_flagged == report.qc_flagged  # still listed on a re-run


_CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys, json
    from pathlib import Path
    import ctprep.io as io

    _real = io.read_volume

    def _fragile(path):
        # Top-level code: also runs in each worker, which imports this script as __mp_main__.
        if "killme" in Path(path).name:
            os.kill(os.getpid(), signal.SIGKILL)
        if "hog" in Path(path).name:
            raise MemoryError()
        return _real(path)

    io.read_volume = _fragile

    if __name__ == "__main__":
        from ctprep.build import build_cache
        from ctprep.config import PreprocessConfig
        cfg = PreprocessConfig(shape=[8, 32, 32], spacing=[4.0, 3.0, 3.0])
        r = build_cache(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], cfg, workers=2, progress=False)
        print(json.dumps({"failures": r.failures, "written_now": r.written_now}))
""")


def test_worker_crash_is_reported_not_hung(tmp_path):
    data = tmp_path / "data"
    names = ["a.nii.gz", "killme.nii.gz", "b.nii.gz", "hog.nii.gz", "c.nii.gz"]
    for i, name in enumerate(names):
        write_volume(data / name, i)
    labels = write_labels(tmp_path / "l.csv", [(n, label_values(i)) for i, n in enumerate(names)])
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(data), str(labels), str(tmp_path / "s.zarr")],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    fails = {f["volume"]: f for f in result["failures"]}
    assert set(fails) == {"killme.nii.gz", "hog.nii.gz"}
    assert fails["killme.nii.gz"]["stage"] == "worker"
    assert "worker died (killed by SIGKILL)" in fails["killme.nii.gz"]["reason"]
    assert "probably out of RAM" in fails["killme.nii.gz"]["reason"]
    assert "out of RAM (MemoryError)" in fails["hog.nii.gz"]["reason"]
    assert result["written_now"] == 3
    written = open_store(tmp_path / "s.zarr").written()
    assert written.tolist() == [True, False, True, False, True]
    assert np.array_equal(open_store(tmp_path / "s.zarr").labels()[0], label_values(0))
