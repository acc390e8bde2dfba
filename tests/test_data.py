"""cttrain.data: slice choice, dataset and loader determinism, distributed and weighted sampling,
host-to-device conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctprep.config import PreprocessConfig
from ctprep.store import create_store
from cttrain.config import AugmentConfig
from cttrain.data import VolumeDataset, make_loader, sampling_weights, slice_indices, to_device
from cttrain.reader import StoreReader

DEPTH = 24


def make_reader(path, n=8, labels=None, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (n, 3)) if labels is None else np.asarray(labels)
    store = create_store(path, volume_names=[f"train_{i}_a_1" for i in range(n)],
                         patient_ids=[f"train_{i}" for i in range(n)], labels=labels,
                         label_names=[f"l{j}" for j in range(labels.shape[1])],
                         cfg=PreprocessConfig(shape=[DEPTH, 8, 8], chunk_slices=4))
    for row in range(n):
        store.write_row(row, rng.integers(0, 256, (DEPTH, 3, 8, 8), dtype=np.uint8), "src", {})
    return StoreReader(path)


@pytest.fixture
def reader(tmp_path):
    return make_reader(tmp_path / "s.zarr")


def loader_rows(ds, **kw):
    args = dict(train=True, seed=7, epoch=0, num_workers=0, prefetch=2, pin_memory=False)
    args.update(kw)
    return torch.cat([b["row"] for b in make_loader(ds, 3, **args)]).tolist()


# ------------------------------------------------------------------------------ slice_indices


@pytest.mark.parametrize("depth,k,stride", [(96, 32, 2), (96, 16, 3), (40, 8, 5), (33, 32, 1)])
def test_train_window_fits_with_the_stride(depth, k, stride):
    starts = set()
    for s in range(50):
        idx = slice_indices(depth, k, stride, True, np.random.default_rng(s))
        assert len(idx) == k and idx.min() >= 0 and idx.max() < depth
        assert (np.diff(idx) == stride).all()
        starts.add(int(idx[0]))
    assert len(starts) > 1 or depth - (k - 1) * stride == 1  # the window moves


def test_train_stride_shrinks_when_the_window_does_not_fit():
    idx = slice_indices(40, 16, 4, True, np.random.default_rng(0))  # (16-1)*4+1 = 61 > 40
    assert len(idx) == 16 and idx.max() < 40
    assert (np.diff(idx) == 2).all()  # the largest stride that fits: 39 // 15


@pytest.mark.parametrize("train", [True, False])
def test_short_volume_is_padded_by_repeating_in_order(train):
    idx = slice_indices(5, 12, 2, train, np.random.default_rng(0))
    assert len(idx) == 12 and (np.diff(idx) >= 0).all()
    assert set(idx.tolist()) == set(range(5))


def test_eval_is_evenly_spaced_deterministic_and_centred():
    idx = slice_indices(96, 32, 2, False, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, slice_indices(96, 32, 2, False, np.random.default_rng(1)))
    np.testing.assert_array_equal(idx, np.arange(1, 96, 3))
    odd = slice_indices(100, 7, 1, False, np.random.default_rng(0))
    assert set(np.diff(odd).tolist()) <= {14, 15} and abs(odd[0] - (99 - odd[-1])) <= 1
    assert slice_indices(9, 1, 1, False, np.random.default_rng(0)).tolist() == [4]


# ------------------------------------------------------------------------------ VolumeDataset


def items(ds):
    return [ds[i] for i in range(len(ds))]


def test_dataset_items(reader):
    ds = VolumeDataset(reader, np.array([5, 2]), slices=6, stride=2, train=True, seed=1)
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (6, 3, 8, 8)
    assert item["target"].dtype == torch.float32
    np.testing.assert_array_equal(item["target"].numpy(), reader.labels[5])
    assert item["row"] == 5


def test_dataset_is_a_function_of_seed_epoch_row(reader):
    a = VolumeDataset(reader, np.arange(8), slices=4, stride=2, train=True, seed=3)
    b = VolumeDataset(reader, np.arange(8)[::-1].copy(), slices=4, stride=2, train=True, seed=3)
    for x, y in zip(items(a), items(b)[::-1], strict=True):  # same rows in another order: same items
        assert torch.equal(x["image"], y["image"])
    first = items(a)
    a.set_epoch(1)
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(first, items(a), strict=True))
    a.set_epoch(0)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(first, items(a), strict=True))


def test_same_batches_with_any_number_of_workers(reader):
    ds = VolumeDataset(reader, np.arange(8), slices=4, stride=2, train=True, seed=3)
    runs = []
    for workers in (0, 2):
        batches = list(make_loader(ds, 3, train=True, seed=5, epoch=2, num_workers=workers, prefetch=1,
                                   pin_memory=False))
        runs.append((torch.cat([b["row"] for b in batches]), torch.cat([b["image"] for b in batches])))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_cpu_augment_applies_to_training_items_only(reader):
    cfg = AugmentConfig(p_affine=1.0, p_intensity=1.0, p_noise=0.0, p_blur=0.0, p_elastic=0.0)
    plain = VolumeDataset(reader, np.arange(2), slices=4, stride=2, train=True, seed=0)
    aug = VolumeDataset(reader, np.arange(2), slices=4, stride=2, train=True, seed=0, cpu_augment=cfg)
    again = VolumeDataset(reader, np.arange(2), slices=4, stride=2, train=True, seed=0, cpu_augment=cfg)
    assert not torch.equal(plain[0]["image"], aug[0]["image"])
    assert torch.equal(aug[0]["image"], again[0]["image"]) and aug[0]["image"].dtype == torch.uint8
    evaluation = VolumeDataset(reader, np.arange(2), slices=4, stride=2, train=False, seed=0, cpu_augment=cfg)
    np.testing.assert_array_equal(evaluation[1]["image"].numpy(), reader.read(1, np.array([3, 9, 15, 21])))


# ------------------------------------------------------------------------------ make_loader


def test_loader_order_is_a_function_of_seed_and_epoch(reader):
    ds = VolumeDataset(reader, np.arange(8), slices=2, stride=1, train=True, seed=0)
    order = loader_rows(ds)
    assert sorted(order) == list(range(8)) and order != list(range(8))
    assert loader_rows(ds) == order
    assert loader_rows(ds, epoch=1) != order
    assert loader_rows(ds, seed=8) != order
    assert loader_rows(ds, train=False) == list(range(8))


@pytest.mark.parametrize("n", [8, 7])
def test_distributed_ranks_are_disjoint_and_cover_everything(tmp_path, n):
    ds = VolumeDataset(make_reader(tmp_path / "s.zarr", n=n), np.arange(n), slices=2, stride=1, train=True, seed=0)
    r0 = loader_rows(ds, rank=0, world_size=2)
    r1 = loader_rows(ds, rank=1, world_size=2)
    assert len(r0) == len(r1) == -(-n // 2)
    assert set(r0) | set(r1) == set(range(n))
    if n % 2 == 0:
        assert not set(r0) & set(r1)
    assert loader_rows(ds, rank=0, world_size=2, epoch=1) != r0


def test_sampling_weights_follow_the_rarest_positive_label():
    labels = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0], [0, 0]])
    w = sampling_weights(labels)
    # label 0: 4/6, label 1: 1/6, no finding: 2/6
    np.testing.assert_allclose(w, [1.5, 1.5, 1.5, 6.0, 3.0, 3.0])


def test_weighted_sampling_favours_rare_label_volumes(tmp_path):
    labels = np.zeros((12, 2), dtype=int)
    labels[:, 0] = 1
    labels[0, 1] = 1  # the only volume with the rare label
    reader = make_reader(tmp_path / "s.zarr", n=12, labels=labels)
    ds = VolumeDataset(reader, np.arange(12), slices=1, stride=1, train=True, seed=0)
    draws = [r for epoch in range(10) for r in loader_rows(ds, epoch=epoch, weighted_sampling=True)]
    assert len(draws) == 120
    counts = np.bincount(draws, minlength=12)
    # weights 12 vs 1: the rare volume should take ~12/23 of the draws, a common one ~1/23
    assert counts[0] > 40 and counts[1:].max() < counts[0] / 3
    assert draws[:12] == loader_rows(ds, epoch=0, weighted_sampling=True)
    r0 = loader_rows(ds, epoch=0, weighted_sampling=True, rank=0, world_size=2)
    r1 = loader_rows(ds, epoch=0, weighted_sampling=True, rank=1, world_size=2)
    assert len(r0) == len(r1) == 6


# ------------------------------------------------------------------------------ to_device


@pytest.mark.parametrize("channels_last", [False, True])
def test_to_device_converts_on_the_device(channels_last):
    image = torch.randint(0, 256, (2, 3, 3, 5, 4), dtype=torch.uint8)
    batch = {"image": image, "target": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "row": torch.tensor([4, 9])}
    x, y, rows = to_device(batch, torch.device("cpu"), channels_last=channels_last)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 3, 5, 4)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    torch.testing.assert_close(x, image.float() / 255.0)
    assert y.dtype == torch.float32 and rows.dtype == torch.int64 and rows.tolist() == [4, 9]
    if channels_last:
        assert x.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
