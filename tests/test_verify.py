"""Checksummed store (issue 9, part 5): a flipped, truncated or missing chunk is found by `ctprep verify`
(named by volume, unflagged, rebuilt by a re-run of build-cache) and stops training with one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_build import label_values, small_cfg, write_labels, write_volume
from test_cli_cttrain import assert_one_line_error
from test_cv import TINY
from typer.testing import CliRunner

from ctprep.build import BuildError, build_cache
from ctprep.cli import app as ctprep_app
from ctprep.store import create_store, has_checksums, open_store
from ctprep.verify import verify_store
from cttrain.cli import app as cttrain_app
from cttrain.reader import StoreReader, StoreReadError

runner = CliRunner()
NAMES = [f"train_{i}_a_1.nii.gz" for i in range(6)]


@pytest.fixture
def built(tmp_path) -> tuple[Path, Path, Path]:
    """(data dir, labels CSV, store) of six small volumes, two folds, every row written."""
    data = tmp_path / "data"
    for i, name in enumerate(NAMES):
        write_volume(data / name, seed=i)
    labels = write_labels(tmp_path / "labels.csv", [(n, label_values(i)) for i, n in enumerate(NAMES)])
    store = tmp_path / "s.zarr"
    assert build_cache(data, labels, store, small_cfg(), progress=False).ok
    handle = open_store(store, mode="r+")
    handle.write_folds(np.arange(len(NAMES)) % 2, {"k": 2, "seed": 0, "method": "test"})
    return data, labels, store


def _flip_byte(store: Path, row: int) -> Path:
    shard = open_store(store).shard_file(row)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF                                        # inside a chunk's compressed bytes
    shard.write_bytes(bytes(raw))
    return shard


def test_new_stores_carry_chunk_checksums(built):
    store = open_store(built[2])
    assert store.checksums and store.attrs["cache_version"] == 2
    for name in ("labels", "folds", "written", "source", "row_info"):
        assert has_checksums(store.array(name)), name


def test_intact_store_verifies_clean(built):
    report = verify_store(built[2])
    assert report.ok and report.checked == len(NAMES) and report.damaged == []
    result = runner.invoke(ctprep_app, ["verify", str(built[2])])
    assert result.exit_code == 0 and "6 written row(s) of 6 read back intact" in result.output


def test_flipped_byte_training_stops_verify_names_it_rebuild_repairs_only_it(built, tmp_path):
    data, labels, store = built
    before = open_store(store).read_images(2)
    _flip_byte(store, 2)
    # training before the repair: one red line naming store, row and volume, no traceback
    args = ["fold", "0", "--cache", str(store), "--folds", "2", "--out", str(tmp_path / "run")]
    for item in TINY:
        args += ["--set", item]
    result = runner.invoke(cttrain_app, args)
    assert_one_line_error(result, 1, str(store), "row 2", NAMES[2], "checksum", "ctprep verify")
    # verify names the volume, exits 1 and unflags exactly that row
    result = runner.invoke(ctprep_app, ["verify", str(store)])
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert NAMES[2] in flat and "checksum mismatch" in flat and "re-run the same" in flat
    assert open_store(store).written().tolist() == [True, True, False, True, True, True]
    # the same build-cache command rebuilds only that row, and the store is intact again
    report = build_cache(data, labels, store, small_cfg(), progress=False)
    assert report.ok and report.to_do == 1 and report.written_now == 1 and report.already_done == 5
    assert verify_store(store).ok
    assert np.array_equal(open_store(store).read_images(2), before)


def test_truncated_and_missing_shards_are_damage(built):
    store = built[2]
    shard = open_store(store).shard_file(1)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    open_store(store).shard_file(4).unlink()
    report = verify_store(store, repair=False)
    assert {d["volume"]: d["reason"].split(" ")[0] for d in report.damaged} == {NAMES[1]: "images:",
                                                                                NAMES[4]: "images"}
    assert "shard file missing" in report.damaged[1]["reason"]
    assert open_store(store).written().all()                          # repair=False changes nothing
    reader = StoreReader(store)
    with pytest.raises(StoreReadError, match=f"row 4 \\({NAMES[4]}\\): its images shard file is missing"):
        reader.read(4, np.arange(4))
    with pytest.raises(StoreReadError, match=f"row 1 \\({NAMES[1]}\\): cannot read slices"):
        reader.read_volume(1)
    assert reader.read_volume(0).shape[0] == reader.depth             # intact rows still read


def test_damage_inside_a_dataloader_worker_is_still_one_line(built):
    import torch

    from cttrain.data import VolumeDataset

    store = built[2]
    _flip_byte(store, 3)
    reader = StoreReader(store)
    dataset = VolumeDataset(reader, np.arange(reader.n), slices=reader.depth, stride=1, train=False, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(StoreReadError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{store}: row 3 ({NAMES[3]}): cannot read slices")


def test_store_without_checksums_reads_and_is_refused_for_resume(tmp_path, monkeypatch):
    """A cache-version-1 store (no crc32c codec): still readable, verify warns, build-cache refuses it
    with the way to rebuild."""
    from zarr.codecs import ZstdCodec

    import ctprep.store as store_module

    data = tmp_path / "data"
    write_volume(data / NAMES[0], seed=0)
    labels = write_labels(tmp_path / "labels.csv", [(NAMES[0], label_values(0))])
    monkeypatch.setattr(store_module, "CACHE_VERSION", 1)
    monkeypatch.setattr(store_module, "_compressors", lambda cfg: [ZstdCodec(level=1)])
    monkeypatch.setattr(store_module, "_small_codecs", lambda: [ZstdCodec(level=0)])
    old = tmp_path / "old.zarr"
    assert build_cache(data, labels, old, small_cfg(), progress=False).ok
    monkeypatch.undo()
    assert not open_store(old).checksums
    assert StoreReader(old).read_volume(0).std() > 5
    result = runner.invoke(ctprep_app, ["verify", str(old)])
    assert result.exit_code == 0 and "no chunk checksums" in " ".join(result.output.split())
    with pytest.raises(BuildError, match="cache version 1 \\(this code writes 2\\).*--overwrite"):
        build_cache(data, labels, old, small_cfg(), progress=False)


def test_damaged_labels_array_is_store_level_damage(tmp_path):
    cfg = small_cfg()
    create_store(tmp_path / "s.zarr", volume_names=["a"], patient_ids=["a"], labels=np.ones((1, 2), np.uint8),
                 label_names=["x", "y"], cfg=cfg)
    chunk = next((tmp_path / "s.zarr" / "labels").rglob("c/*/*"))
    chunk.write_bytes(b"\0" + chunk.read_bytes()[1:])
    report = verify_store(tmp_path / "s.zarr")
    assert not report.ok and report.checked == 0
    assert report.store_damage and "array 'labels' is damaged" in report.store_damage[0]
    assert "--overwrite" in report.store_damage[0]


def test_shard_bytes_check_without_decompressing(built):
    from ctprep.verify import shard_bytes_problem

    store = open_store(built[2])
    raw = store.shard_file(0).read_bytes()
    per_shard = store.image_shape[0] // store.array("images").chunks[1]
    assert shard_bytes_problem(raw, per_shard) is None
    flipped = bytearray(raw)
    flipped[10] ^= 1
    assert "checksum mismatch" in shard_bytes_problem(bytes(flipped), per_shard)
    index = bytearray(raw)
    index[-10] ^= 1
    assert shard_bytes_problem(bytes(index), per_shard) == "shard index checksum mismatch"
    assert "shorter than its index" in shard_bytes_problem(raw[:20], per_shard)
