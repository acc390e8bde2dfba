"""cttrain.reader: slice reads against the full array, channel selection, pickling, workers, folds."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ctprep.config import PreprocessConfig
from ctprep.shard_read import ShardReader
from ctprep.store import create_store
from cttrain.data import VolumeDataset, make_loader
from cttrain.reader import FoldError, StoreReader, fold_rows

DEPTH, H, W, CHUNK = 24, 12, 10, 4


def make_store(path, n=6, written=None, folds=None, k=None, seed=0):
    """A small store whose images are random (so any misplaced slice shows); returns the images."""
    rng = np.random.default_rng(seed)
    cfg = PreprocessConfig(shape=[DEPTH, H, W], chunk_slices=CHUNK)
    labels = rng.integers(0, 2, (n, 4))
    store = create_store(path, volume_names=[f"train_{i}_a_1" for i in range(n)],
                         patient_ids=[f"train_{i}" for i in range(n)], labels=labels,
                         label_names=["a", "b", "c", "d"], cfg=cfg)
    images = rng.integers(0, 256, (n, DEPTH, 3, H, W), dtype=np.uint8)
    for row in range(n) if written is None else written:
        store.write_row(row, images[row], "src", {})
    if folds is not None:
        store.write_folds(np.asarray(folds), {"k": k if k is not None else int(max(folds)) + 1})
    return images, labels


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "cache.zarr"
    images, labels = make_store(path)
    return path, images, labels


@pytest.mark.parametrize("idx", [
    [0], [23], [5, 7, 9, 11], list(range(0, 24, 3)), [9, 2, 2, 17, 0], [1, 2, 21, 22], list(range(24)),
])
def test_read_returns_exactly_the_requested_slices(store, idx):
    path, images, _ = store
    reader = StoreReader(path)
    out = reader.read(3, np.array(idx))
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, images[3][idx])


def test_metadata(store):
    path, _, labels = store
    reader = StoreReader(path)
    assert (reader.n, reader.depth, reader.num_channels) == (6, DEPTH, 3)
    assert reader.image_shape == (DEPTH, 3, H, W)
    assert reader.label_names == ["a", "b", "c", "d"]
    assert reader.volume_names[2] == "train_2_a_1" and reader.patient_ids[2] == "train_2"
    np.testing.assert_array_equal(reader.labels, labels)
    assert reader.written.all() and (reader.folds == -1).all()


def test_channels_selected_by_name_in_the_given_order(store):
    path, images, _ = store
    reader = StoreReader(path, channels=["wide", "lung"])
    assert reader.num_channels == 2 and reader.image_shape == (DEPTH, 2, H, W)
    assert reader.channel_names == ["wide", "lung"]
    idx = np.array([4, 8, 12])
    np.testing.assert_array_equal(reader.read(1, idx), images[1][idx][:, [2, 0]])


def test_unknown_channel_names_it_and_the_windows(store):
    path, _, _ = store
    with pytest.raises(ValueError, match=r"'bone'.*lung, mediastinum, wide"):
        StoreReader(path, channels=["lung", "bone"])


def test_read_bad_indices(store):
    reader = StoreReader(store[0])
    with pytest.raises(IndexError, match="slice index"):
        reader.read(0, np.array([0, DEPTH]))
    with pytest.raises(IndexError, match="row 6"):
        reader.read(6, np.array([0]))


class _Spy:
    """Records the slice spans read from the images array."""

    def __init__(self, arr):
        self.arr, self.spans = arr, []

    def __getitem__(self, key):
        self.spans.append((key[1].start, key[1].stop))
        return self.arr[key]


def test_sparse_read_touches_only_the_chunks_it_needs(store):
    """Through zarr: the slice spans asked of the images array."""
    path, images, _ = store
    reader = StoreReader(path)
    reader.direct = False
    spy = _Spy(reader._array())
    reader._images = spy
    out = reader.read(0, np.array([1, 2, 21]))  # chunks 0 and 5 of 6: never decode chunks 1-4
    np.testing.assert_array_equal(out, images[0][[1, 2, 21]])
    assert spy.spans and all(stop <= CHUNK or start >= 5 * CHUNK for start, stop in spy.spans)
    spy.spans.clear()
    reader.read(0, np.arange(4, 16, 2))  # a window is one contiguous read
    assert spy.spans == [(4, 15)]


class _DecodeSpy(ShardReader):
    """Records the chunk runs decoded and the byte ranges read from the shard file."""

    def __init__(self, layout):
        super().__init__(layout)
        self.runs, self.reads = [], []

    def decode(self, read, size, index, first, last, out):
        self.runs.append((first, last))

        def counted(offset, n):
            self.reads.append((offset, n))
            return read(offset, n)

        super().decode(counted, size, index, first, last, out)


def test_direct_read_decodes_only_the_chunks_it_needs(store):
    """The direct path (the default for ctprep's layout): chunk runs decoded, one file read each."""
    path, images, _ = store
    reader = StoreReader(path)
    assert reader.direct
    spy = reader._direct = _DecodeSpy(reader._layout)
    out = reader.read(0, np.array([1, 2, 21]))
    np.testing.assert_array_equal(out, images[0][[1, 2, 21]])
    assert spy.runs == [(0, 0), (5, 5)] and len(spy.reads) == 2
    spy.runs.clear()
    spy.reads.clear()
    np.testing.assert_array_equal(reader.read(0, np.arange(4, 16, 2)), images[0][4:16:2])
    assert spy.runs == [(1, 3)] and len(spy.reads) == 1


def test_direct_and_zarr_reads_agree(store):
    path, _, _ = store
    direct, via_zarr = StoreReader(path, channels=["wide", "lung"]), StoreReader(path, channels=["wide", "lung"])
    via_zarr.direct = False
    rng = np.random.default_rng(3)
    for row in range(direct.n):
        for _ in range(4):
            idx = rng.choice(DEPTH, size=int(rng.integers(1, 9)), replace=True)
            np.testing.assert_array_equal(direct.read(row, idx), via_zarr.read(row, idx))


def test_reader_pickles_without_its_handle_and_reads_after(store):
    path, images, _ = store
    reader = StoreReader(path, channels=["mediastinum"])
    reader.read(0, np.array([0]))
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._images is None
    np.testing.assert_array_equal(clone.read(2, np.array([3, 4])), images[2][[3, 4]][:, [1]])


def test_reader_works_in_dataloader_workers(store):
    path, images, labels = store
    reader = StoreReader(path)
    reader.read(0, np.array([0]))  # the parent has an open handle before the fork
    ds = VolumeDataset(reader, np.arange(6), slices=4, stride=2, train=False, seed=0)
    loader = make_loader(ds, 2, train=False, seed=0, epoch=0, num_workers=2, prefetch=2, pin_memory=False)
    batches = list(loader)
    rows = torch.cat([b["row"] for b in batches]).numpy()
    np.testing.assert_array_equal(rows, np.arange(6))
    eval_idx = np.array([3, 9, 15, 21])  # 4 evenly spaced of 24
    got = torch.cat([b["image"] for b in batches]).numpy()
    np.testing.assert_array_equal(got, images[:, eval_idx])
    np.testing.assert_array_equal(torch.cat([b["target"] for b in batches]).numpy(), labels)


# ---------------------------------------------------------------------------------- fold_rows


def test_fold_rows_skips_unwritten_and_counts_them(tmp_path):
    folds = [0, 1, 2, 0, 1, 2, 0, 1]
    make_store(tmp_path / "s.zarr", n=8, written=[0, 1, 2, 4, 5, 7], folds=folds)
    reader = StoreReader(tmp_path / "s.zarr")
    train, val, skipped = fold_rows(reader, 1, 3)
    assert skipped == 2
    np.testing.assert_array_equal(val, [1, 4, 7])
    np.testing.assert_array_equal(train, [0, 2, 5])
    all_val = np.concatenate([fold_rows(reader, f, 3)[1] for f in range(3)])
    np.testing.assert_array_equal(np.sort(all_val), [0, 1, 2, 4, 5, 7])


def test_fold_rows_without_folds_says_run_make_folds(store):
    with pytest.raises(FoldError, match="run `ctprep make-folds"):
        fold_rows(StoreReader(store[0]), 0, 5)


def test_fold_rows_wrong_k_and_out_of_range(tmp_path):
    make_store(tmp_path / "s.zarr", n=10, folds=[0, 1, 2, 3, 4] * 2)
    reader = StoreReader(tmp_path / "s.zarr")
    with pytest.raises(FoldError, match="store has 5 folds, --folds 3 asked"):
        fold_rows(reader, 0, 3)
    with pytest.raises(FoldError, match="fold 5 out of range"):
        fold_rows(reader, 5, 5)
    assert isinstance(FoldError("x"), ValueError)


def test_fold_rows_written_row_without_fold(tmp_path):
    make_store(tmp_path / "s.zarr", n=4, folds=[0, 1, -1, 1], k=2)
    with pytest.raises(FoldError, match="1 written volumes have no fold.*train_2_a_1"):
        fold_rows(StoreReader(tmp_path / "s.zarr"), 0, 2)


@pytest.mark.parametrize("compressor", ["zstd", "blosc-lz4", "blosc-zstd", "none"])
def test_every_configured_compressor_reads_directly(tmp_path, compressor):
    rng = np.random.default_rng(5)
    cfg = PreprocessConfig(shape=[DEPTH, H, W], chunk_slices=CHUNK, compressor=compressor)
    store = create_store(tmp_path / "c.zarr", volume_names=["train_1_a_1", "train_2_a_1"],
                         patient_ids=["train_1", "train_2"], labels=np.zeros((2, 1)), label_names=["a"], cfg=cfg)
    images = rng.integers(0, 256, (DEPTH, 3, H, W), dtype=np.uint8)
    images[8:12] = 0                                   # an all-fill chunk is written too (write_empty_chunks)
    store.write_row(0, images, "src", {})
    reader = StoreReader(tmp_path / "c.zarr")
    assert reader.direct and reader._layout.codec == compressor.split("-")[0]
    np.testing.assert_array_equal(reader.read_volume(0), images)
    np.testing.assert_array_equal(reader.read_volume(1), np.zeros_like(images))   # unwritten row: fill value


def test_a_layout_ctprep_does_not_write_reads_through_zarr(tmp_path):
    """An `images` array without shards (written by some other tool): no direct path, same answers."""
    import zarr

    path = tmp_path / "plain.zarr"
    make_store(path, n=2)
    group = zarr.open_group(str(path), mode="r+")
    images = group["images"][:]
    del group["images"]
    group.create_array("images", data=images, chunks=(1, CHUNK, 3, H, W))
    reader = StoreReader(path)
    assert not reader.direct
    np.testing.assert_array_equal(reader.read(1, np.array([3, 9, 22])), images[1][[3, 9, 22]])
