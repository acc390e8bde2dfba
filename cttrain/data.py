"""Stream K slices per volume from the ctprep store into batches.

Randomness is a pure function of (seed, epoch, row): which slices a volume contributes and its CPU
augmentation do not depend on the number of workers, the worker a sample lands on, or the order
samples are drawn. The sample order is a function of (seed, epoch) too, so a run is repeatable.

A loader is built once per epoch (`make_loader(..., epoch=e)`): workers then start with the epoch
already set, which is why persistent workers are off — a persistent worker would keep the dataset
copy (and epoch) it was started with. Workers are forked where the platform allows it: zarr 3
resets its event loop and thread pool in a forked child (`os.register_at_fork`), the reader opens
its own zarr handle per process, and a fork starts in milliseconds instead of re-importing torch.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from cttrain.config import AugmentConfig
from cttrain.reader import StoreReader


def _bin_centres(depth: int, k: int) -> np.ndarray:
    """k slices at the centres of k equal bins over [0, depth): evenly spaced, symmetric about the
    middle of the volume, and (when depth < k) each slice repeated in order to pad."""
    return ((np.arange(k) + 0.5) * depth / k).astype(np.int64)


def slice_indices(depth: int, k: int, stride: int, train: bool, rng: np.random.Generator) -> np.ndarray:
    """Sorted slice indices (k,) into a volume of `depth` slices.

    train: a contiguous window of k slices `stride` apart at a random position; the stride shrinks
    when the window would not fit (depth < (k-1)*stride + 1), and a volume with fewer than k
    slices is padded by repeating slices. eval: k evenly spaced slices over the whole depth."""
    if depth < 1 or k < 1 or stride < 1:
        raise ValueError(f"slice_indices needs depth, k, stride >= 1 (got {depth}, {k}, {stride})")
    if not train or depth < k:
        return _bin_centres(depth, k)
    step = stride if k == 1 else max(1, min(stride, (depth - 1) // (k - 1)))
    span = (k - 1) * step + 1
    start = int(rng.integers(0, depth - span + 1))
    return start + step * np.arange(k, dtype=np.int64)


def _sample_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (SeedSequence hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class VolumeDataset(Dataset):
    """One item per volume: K slices (uint8), its multi-hot target and its store row.

    `cpu_augment` (the albumentations backend) is applied to training items only, in the worker."""

    def __init__(self, reader: StoreReader, rows: np.ndarray, slices: int, stride: int, train: bool,
                 seed: int, cpu_augment: AugmentConfig | None = None) -> None:
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)
        self.slices = int(slices)
        self.stride = int(stride)
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        self.cpu_augment = cpu_augment if (train and cpu_augment is not None and cpu_augment.enabled) else None
        self._augment: Callable[[np.ndarray, int], np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def targets(self) -> np.ndarray:
        """(len, L) uint8 labels of the dataset's rows, in item order."""
        return self.reader.labels[self.rows]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        row, idx, rng = self._plan(i)
        return self._item(row, self.reader.read(row, idx), rng)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor | int]]:
        """A batch's items, as `[self[i] for i in indices]` (the DataLoader fetches a batch through
        this), with the volumes read together by `StoreReader.read_many`: on a remote store their
        network waits overlap instead of adding up."""
        if self.reader.read_ahead <= 1:
            return [self[i] for i in indices]
        plans = [self._plan(i) for i in indices]
        images = self.reader.read_many([(row, idx) for row, idx, _rng in plans])
        return [self._item(row, image, rng) for (row, _idx, rng), image in zip(plans, images, strict=True)]

    def _plan(self, i: int) -> tuple[int, np.ndarray, np.random.Generator]:
        """(row, slice indices, the item's generator): a pure function of (seed, epoch, row)."""
        row = int(self.rows[i])
        rng = np.random.default_rng(_sample_seed(self.seed, self.epoch, row))
        return row, slice_indices(self.reader.depth, self.slices, self.stride, self.train, rng), rng

    def _item(self, row: int, image: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor | int]:
        if self.cpu_augment is not None:
            if self._augment is None:  # built in the worker: albumentations objects stay out of pickles
                from cttrain.augment_cpu import build_cpu_augment

                self._augment = build_cpu_augment(self.cpu_augment)
            image = self._augment(image, int(rng.integers(2**31)))
        return {
            "image": torch.from_numpy(image),
            "target": torch.from_numpy(self.reader.labels[row].astype(np.float32)),
            "row": row,
        }

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_augment"] = None
        return state


def sampling_weights(labels: np.ndarray) -> np.ndarray:
    """Per-volume weight = 1 / frequency of its rarest positive label; a volume with no positive
    label is weighted by 1 / frequency of 'no finding'. Frequencies are over the given rows."""
    labels = np.asarray(labels, dtype=bool)
    n = len(labels)
    freq = labels.sum(axis=0) / max(n, 1)
    none = ~labels.any(axis=1)
    inv = np.where(freq > 0, 1.0 / np.maximum(freq, 1e-12), 0.0)
    weights = np.where(labels, inv[None, :], 0.0).max(axis=1) if labels.shape[1] else np.zeros(n)
    if none.any():
        weights[none] = n / none.sum()
    return weights


class _EpochIndices(Sampler[int]):
    """A fixed list of indices for one epoch (weighted draws, sharded across ranks)."""

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = [int(i) for i in indices]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _weighted_indices(dataset: VolumeDataset, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """len(dataset) weighted draws with replacement; every rank draws the same list and keeps its
    own stride of it, so ranks see disjoint draws that together form one weighted sample."""
    weights = torch.as_tensor(sampling_weights(dataset.targets()), dtype=torch.double)
    gen = torch.Generator().manual_seed(_sample_seed(seed, epoch, 1))
    n = len(dataset)
    total = -(-n // world_size) * world_size
    draws = torch.multinomial(weights, total, replacement=True, generator=gen).numpy()
    return draws[rank::world_size]


def _sampler(dataset: VolumeDataset, *, train: bool, seed: int, epoch: int, rank: int, world_size: int,
             weighted_sampling: bool, drop_last: bool) -> Sampler[int] | None:
    if train and weighted_sampling:
        return _EpochIndices(_weighted_indices(dataset, seed, epoch, rank, world_size))
    if world_size > 1:
        # Evaluation with several ranks: DistributedSampler pads by repeating rows so every rank
        # gets the same number; deduplicate predictions by `row` after gathering.
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                     drop_last=drop_last and train)
        sampler.set_epoch(epoch)
        return sampler
    if train:
        return RandomSampler(dataset, generator=torch.Generator().manual_seed(_sample_seed(seed, epoch)))
    return None


def _single_thread_opencv() -> None:
    """Put OpenCV in this (parent) process at one thread before forking loader workers.

    A forked worker must never enter a thread pool the parent had started: OpenCV's then deadlocks
    (seen here: `cv2.setNumThreads` in a worker after the parent had run CLAHE). With the parent at one
    thread, workers inherit that setting and run OpenCV (albumentations) serially, which is also what
    N worker processes on N cores want."""
    import cv2

    cv2.setNumThreads(1)


def worker_context() -> str | None:
    """'fork' where available (Linux): cheap worker start, safe with zarr 3 (see module doc)."""
    return "fork" if "fork" in mp.get_all_start_methods() else None


def make_loader(dataset: VolumeDataset, batch_size: int, *, train: bool, seed: int, epoch: int,
                num_workers: int, prefetch: int, pin_memory: bool, drop_last: bool = False, rank: int = 0,
                world_size: int = 1, weighted_sampling: bool = False) -> DataLoader:
    """A DataLoader for one epoch. train: order shuffled by (seed, epoch); `world_size` > 1 shards it
    with DistributedSampler; `weighted_sampling` draws volumes by their rarest positive label.
    `pin_memory` only takes effect when CUDA is available."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    dataset.set_epoch(epoch)
    sampler = _sampler(dataset, train=train, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                       weighted_sampling=weighted_sampling, drop_last=drop_last)
    workers = max(0, int(num_workers))
    extra = {}
    if workers > 0:
        _single_thread_opencv()
        extra = {"prefetch_factor": max(1, int(prefetch)), "multiprocessing_context": worker_context(),
                 "persistent_workers": False}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=bool(pin_memory) and torch.cuda.is_available(), drop_last=drop_last,
                      **extra)


def eval_loader(reader: StoreReader, rows: np.ndarray, data_cfg: Any, *, seed: int, cuda: bool,
                batch_size: int | None = None, drop_last: bool = False) -> DataLoader:
    """Every row of `rows` in one process, evaluation slices, no augmentation (prediction, and the
    training rows for training.precise_bn). Memory is pinned only for a CUDA device."""
    d = data_cfg
    dataset = VolumeDataset(reader, rows, d.slices, d.slice_stride, train=False, seed=seed)
    return make_loader(dataset, batch_size or d.batch_size, train=False, seed=seed, epoch=0,
                       num_workers=d.num_workers, prefetch=d.prefetch, pin_memory=d.pin_memory and cuda,
                       drop_last=drop_last)


def to_device(batch: dict, device: torch.device, channels_last: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, rows) on `device`: x float (B, K, C, H, W) in [0, 1], y float (B, L), rows int64 (B,).

    Pixels cross the bus as uint8 (4x fewer bytes than float) and are converted on the device.
    With `channels_last`, x is a (B, K, ...) view of a channels-last (B*K, C, H, W) tensor, so the
    model's `x.flatten(0, 1)` is channels-last without another copy."""
    device = torch.device(device)
    image, target, rows = batch["image"], batch["target"], batch["row"]
    if device.type == "cuda" and not image.is_pinned():
        image = image.pin_memory()
    image = image.to(device, non_blocking=True)
    b, k, c, h, w = image.shape
    if channels_last:
        x = image.view(b * k, c, h, w).to(dtype=torch.float32, memory_format=torch.channels_last)
        x = x.div_(255.0).view(b, k, c, h, w)
    else:
        x = image.float().div_(255.0)
    y = target.to(device, dtype=torch.float32, non_blocking=True)
    return x, y, torch.as_tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


__all__ = ["VolumeDataset", "eval_loader", "make_loader", "sampling_weights", "slice_indices", "to_device",
           "worker_context"]
