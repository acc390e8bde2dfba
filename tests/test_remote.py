"""The store on S3 (a local moto server, `s3` fixture): a job array of shards builds one remote store
without locks, equal to a local build byte for byte; a killed shard resumes; the shards' reports
merge; the reader streams it; bad credentials and a missing bucket are one line naming the URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_build import REPO, make_dataset, small_cfg, store_snapshot
from test_build_resume import MORE_NAMES, _kill_after, _start
from typer.testing import CliRunner

from ctprep import remote
from ctprep.build import build_cache
from ctprep.cli import app as ctprep_app

runner = CliRunner()
SETS = ["--set", "preprocess.shape=[8, 32, 32]", "--set", "preprocess.spacing=[4, 3, 3]"]  # = small_cfg()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A dataset and its uninterrupted local build (the reference)."""
    root = tmp_path_factory.mktemp("remote")
    data, labels = make_dataset(root, MORE_NAMES)
    report = build_cache(data, labels, root / "local" / "s.zarr", small_cfg(), progress=False)
    assert report.ok
    return root, data, labels, root / "local" / "s.zarr"


def _shard_cli(data: Path, labels: Path, out: str, shard: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ctprep", "build-cache", "--data-dir", str(data), "--labels", str(labels),
           "--out", out, "--shard", shard, *SETS, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8")


def _objects(url: str, s3) -> dict[str, bytes]:
    """key -> bytes of every object of a remote store."""
    fs = s3.fs()
    fs.invalidate_cache()
    root = url.split("://", 1)[1]
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def assert_same_bytes(url: str, local_store: Path, s3) -> None:
    """Every file of the local store is an object of the remote one with the same bytes; the row
    infos (which hold wall-clock timings) only decode equal, and the remote has its creation claim."""
    ours, theirs = _objects(url, s3), _files(local_store)
    assert set(ours) - set(theirs) == {"ctprep-creator.json"}
    assert set(theirs) <= set(ours)
    differ = sorted(k for k in theirs if ours[k] != theirs[k])
    assert all(k.startswith("row_info/") for k in differ), differ
    a, b = store_snapshot(local_store), _remote_snapshot(url)
    assert a["attrs"] == b["attrs"]
    for name in ("images", "labels", "folds", "written", "source"):
        assert np.array_equal(a[name], b[name]), name


def _remote_snapshot(url: str) -> dict:
    import zarr

    g = zarr.open_group(url, mode="r", storage_options=remote.storage_options())
    out = {"attrs": dict(g.attrs)}
    for name in ("images", "labels", "folds", "written", "source", "row_info"):
        out[name] = np.asarray(g[name][:])
    return out


def test_two_concurrent_shards_build_one_remote_store_equal_to_a_local_build(local, s3):
    _root, data, labels, local_store = local
    url = s3.url("array/s.zarr")
    procs = [_shard_cli(data, labels, url, f"{i}/2") for i in range(2)]   # both race to create it
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, out + err
    assert_same_bytes(url, local_store, s3)
    for i in range(2):
        report = json.loads(remote.read_text(f"{url}.failures.shard-{i}-of-2.json"))
        assert report["shard"] == [i, 2] and report["failures"] == []

    info = runner.invoke(ctprep_app, ["info", url, "--json"])
    assert info.exit_code == 0, info.output
    data_info = json.loads(info.stdout)
    assert data_info["written"] == len(MORE_NAMES) and data_info["bytes_on_disk"] > 0
    assert len(data_info["failure_reports"]["reports"]) == 2 and data_info["failure_reports"]["open"] == []
    verified = runner.invoke(ctprep_app, ["verify", url])
    assert verified.exit_code == 0, verified.output
    assert "merged the build-cache failure reports" in verified.output
    merged = json.loads(remote.read_text(f"{url}.failures.json"))
    assert merged["shard"] == "merged" and len(merged["merged_from"]) == 2 and merged["failures"] == []


def test_killed_shard_resumes_and_the_store_equals_a_local_build(local, s3, tmp_path):
    _root, data, labels, local_store = local
    url = s3.url("killed/s.zarr")
    create = runner.invoke(ctprep_app, ["build-cache", "--data-dir", data, "--labels", labels, "--out", url,
                                        "--create-only", *SETS])
    assert create.exit_code == 0 and "store ready" in create.output, create.output
    marks = tmp_path / "marks0.txt"
    victim = _start(tmp_path, data, labels, url, marks, delay=0.3, shard="0/2")   # killed in/near a row write
    other = _shard_cli(data, labels, url, "1/2")
    _kill_after(victim, marks, 2)
    out, err = other.communicate(timeout=180)
    assert other.returncode == 0, out + err
    from ctprep.store import open_store

    written = open_store(url).written()
    assert written[1::2].all() and not written[0::2].all()              # shard 0 was cut short
    resumed = _shard_cli(data, labels, url, "0/2")
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out + err
    done = int(written[0::2].sum())
    assert f"{len(MORE_NAMES) // 2 - done} volume(s) to build, {done} already done" in out
    assert_same_bytes(url, local_store, s3)


def test_a_shard_with_other_inputs_is_refused(local, s3, tmp_path):
    _root, data, labels, _ = local
    url = s3.url("mixed/s.zarr")
    assert runner.invoke(ctprep_app, ["build-cache", "--data-dir", data, "--labels", labels, "--out", url,
                                      "--create-only", *SETS]).exit_code == 0
    other = runner.invoke(ctprep_app, ["build-cache", "--data-dir", data, "--labels", labels, "--out", url,
                                       "--shard", "1/2", "--set", "preprocess.shape=[8, 16, 16]",
                                       "--set", "preprocess.spacing=[4, 3, 3]"])
    assert other.exit_code == 2
    assert "another preprocess config" in other.output and url in other.output


def test_reader_streams_the_remote_store_with_read_ahead(local, s3):
    from cttrain.data import VolumeDataset
    from cttrain.reader import StoreReader

    _root, data, labels, local_store = local
    url = s3.url("reader/s.zarr")
    fs = s3.fs()
    fs.put(str(local_store), url.split("://", 1)[1], recursive=True)
    remote.configure(remote.StorageConfig(read_ahead=4))
    near, far = StoreReader(local_store), StoreReader(url)
    assert far.remote and far.read_ahead == 4 and near.read_ahead == 1
    assert far.written.all() and np.array_equal(far.labels, near.labels)
    rows = np.arange(near.n)
    a = VolumeDataset(near, rows, slices=4, stride=2, train=True, seed=3)
    b = VolumeDataset(far, rows, slices=4, stride=2, train=True, seed=3)
    batch_a, batch_b = a.__getitems__(list(rows)), b.__getitems__(list(rows))
    for x, y in zip(batch_a, batch_b, strict=True):
        assert x["row"] == y["row"] and np.array_equal(x["image"].numpy(), y["image"].numpy())

    fs.rm(url.split("://", 1)[1] + "/images/c/3/0/0/0/0")                  # a written row's shard gone
    with pytest.raises(Exception, match=r"row 3 .*shard file is missing"):
        far.read_many([(2, np.arange(4)), (3, np.arange(4))])


def _one_line_error(result, *words: str) -> None:
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error:") and all(w in lines[0] for w in words), lines[0]


def test_missing_bucket_and_bad_credentials_are_one_line_naming_the_url(local, s3):
    _root, data, labels, _ = local
    wide = CliRunner()
    nobucket = "s3://no-such-bucket/s.zarr"
    _one_line_error(wide.invoke(ctprep_app, ["info", nobucket]), nobucket, "bucket 'no-such-bucket' does not exist")
    _one_line_error(wide.invoke(ctprep_app, ["build-cache", "--data-dir", data, "--labels", labels, "--out",
                                             nobucket, *SETS]), nobucket, "does not exist")
    bad = ["--storage-option", "key=AKIAWRONGWRONGWRONG", "--storage-option", "secret=not-the-secret"]
    url = s3.url("bad/s.zarr")
    _one_line_error(wide.invoke(ctprep_app, ["info", url, *bad]), url, "access denied")
    _one_line_error(wide.invoke(ctprep_app, ["build-cache", "--data-dir", data, "--labels", labels, "--out", url,
                                             *SETS, *bad]), url, "access denied")


def test_bad_credentials_from_the_environment_in_a_real_process(s3):
    url = s3.url("env/s.zarr")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG", "AWS_SECRET_ACCESS_KEY": "nope"}
    proc = subprocess.run([sys.executable, "-m", "ctprep", "info", url], cwd=REPO, env=env, capture_output=True,
                          encoding="utf-8", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "access denied" in lines[0], proc.stderr
    assert "nope" not in proc.stderr


def test_storage_options_parse_merge_and_never_hold_a_file(tmp_path):
    from ctprep.config import ConfigError

    assert remote.parse_options(["endpoint_url=http://h:9000", "anon=true", "client_kwargs.region_name=eu",
                                 "secret=a:b{c}"]) == {"endpoint_url": "http://h:9000", "anon": True,
                                                       "client_kwargs": {"region_name": "eu"}, "secret": "a:b{c}"}
    with pytest.raises(ConfigError, match="key=value"):
        remote.parse_options(["endpoint_url"])
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("storage:\n  options: {endpoint_url: http://yaml:1, use_ssl: false}\n  read_ahead: 3\n",
                   encoding="utf-8")
    remote.configure(remote.StorageConfig(options={"endpoint_url": "http://parent:1", "profile": "p"}))
    got = remote.load_storage(cfg, ["storage.options.endpoint_url=http://set:1"], ["key=k"])
    assert got.options == {"endpoint_url": "http://set:1", "profile": "p", "use_ssl": False, "key": "k"}
    assert got.read_ahead == 3
    with pytest.raises(ConfigError, match="storage.read_ahed"):
        remote.load_storage(None, ["storage.read_ahed=2"])
    from cttrain.config import load_config, save_config

    save_config(load_config(cfg), tmp_path / "run.yaml")                # the run's config has no storage
    assert "storage" not in (tmp_path / "run.yaml").read_text(encoding="utf-8")


def test_a_creator_with_other_inputs_is_refused_before_it_uploads(s3):
    from ctprep.remote_store import CLAIM, create_remote
    from ctprep.store import StoreError

    url = s3.url("claimed/s.zarr")
    remote.write_text(f"{url}/{CLAIM}", json.dumps({"inputs": "another-labels-csv", "by": "node7:42", "at": "t"}))
    with pytest.raises(StoreError, match=r"another build-cache \(node7:42, t\) is creating this store from other"):
        create_remote(url, volume_names=["train_1_a_1"], patient_ids=["train_1"], labels=np.zeros((1, 1)),
                      label_names=["Cardiomegaly"], cfg=small_cfg())
    assert set(_objects(url, s3)) == {CLAIM}                            # nothing of ours was uploaded


def test_state_of_a_prefix_absent_creating_other_store(s3):
    """`remote_store.state`: nothing; a claim (a creator at work); objects without a claim (not ours:
    refused); a root zarr.json (a store). A listing taken while a creator uploads sees its claim."""
    from ctprep.remote_store import CLAIM, state

    fs = s3.fs()
    url = s3.url("states/s.zarr")
    root = url.split("://", 1)[1]
    assert state(url) == "absent"
    fs.pipe_file(f"{root}/{CLAIM}", b"{}")
    fs.pipe_file(f"{root}/labels/zarr.json", b"{}")
    assert state(url) == "creating"
    fs.pipe_file(f"{root}/zarr.json", b"{}")
    assert state(url) == "store"
    stray = s3.url("states/other.zarr")
    fs.pipe_file(f"{stray.split('://', 1)[1]}/notes.txt", b"not a store")
    assert state(stray) == "other"
