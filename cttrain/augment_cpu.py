"""The albumentations counterpart of `cttrain.augment.DeviceAugment` (`augment.backend: albumentations`).

It runs in the DataLoader workers on uint8 volumes (K, C, H, W). A volume's K*C planes are passed to
albumentations as the channels of one (H, W, K*C) image, so a single draw of every parameter
applies to all slices alike (the slices stay registered, as on the device path). Same steps, same
order, same `AugmentConfig` fields and the same edge replication outside the image as the device
path:

flip + affine -> elastic -> Gaussian blur -> contrast/brightness/gamma -> Gaussian noise.

Differences that remain: the elastic field is albumentations' smoothed random field (Simard et al.,
ICDAR 2003) rather than an upsampled coarse grid; its smoothing and amplitude are calibrated so its
correlation length and displacement std match `elastic_grid` and `elastic_alpha`. Contrast is a
custom step (about each window's mean, like the device path) because albumentations'
RandomBrightnessContrast scales about 0.
"""

from __future__ import annotations

import math
import random
from typing import Any

import albumentations as A
import cv2
import numpy as np

from cttrain.config import AugmentConfig


class WindowIntensity(A.ImageOnlyTransform):
    """Contrast about each window's mean, additive brightness, then gamma — on an (H, W, K*C) uint8
    stack whose channel j belongs to window j % channels. One 256-entry lookup table per window."""

    def __init__(self, channels: int, brightness: float, contrast: float, gamma: tuple[float, float],
                 p: float = 0.5) -> None:
        super().__init__(p=p)
        self.channels, self.brightness, self.contrast, self.gamma = channels, brightness, contrast, tuple(gamma)

    def get_params(self) -> dict[str, float]:
        rnd = self.py_random
        return {"shift": rnd.uniform(-self.brightness, self.brightness),
                "gain": rnd.uniform(1.0 - self.contrast, 1.0 + self.contrast),
                "gamma": rnd.uniform(*self.gamma)}

    def apply(self, img: np.ndarray, shift: float = 0.0, gain: float = 1.0, gamma: float = 1.0,
              **params: Any) -> np.ndarray:
        h, w, kc = img.shape
        means = img.reshape(h * w, kc // self.channels, self.channels).mean(axis=(0, 1)) / 255.0
        levels = np.arange(256, dtype=np.float32)[None, :] / 255.0
        lut = levels * gain + (means[:, None] * (1.0 - gain) + shift)
        lut = np.rint(255.0 * np.clip(lut, 0.0, 1.0) ** gamma).astype(np.uint8)  # (channels, 256)
        window = np.arange(kc) % self.channels
        return lut[window[None, None, :], img]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("channels", "brightness", "contrast", "gamma")


def _elastic_scale(h: int, w: int, sigma: float) -> float:
    """Displacement std (pixels) of albumentations' elastic field per unit alpha, measured once per
    image shape with a fixed seed: the border handling of its smoothing makes a closed form
    inaccurate."""
    from albumentations.augmentations.geometric.functional import generate_displacement_fields

    rng = np.random.default_rng(0)
    fields = [generate_displacement_fields((h, w), 1.0, sigma, False, (0, 0), rng, "uniform") for _ in range(4)]
    return float(np.std(np.stack([np.stack(f) for f in fields])))


def _pipeline(cfg: AugmentConfig, h: int, w: int, channels: int) -> A.Compose:
    size = math.sqrt(h * w)
    steps: list[Any] = []
    if cfg.hflip > 0:
        steps.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.p_affine > 0:
        steps.append(A.Affine(rotate=(-cfg.rotate_deg, cfg.rotate_deg), scale=tuple(cfg.scale),
                              translate_percent=(-cfg.translate, cfg.translate), interpolation=cv2.INTER_LINEAR,
                              border_mode=cv2.BORDER_REPLICATE, p=cfg.p_affine))
    if cfg.p_elastic > 0 and cfg.elastic_alpha > 0:
        # The device grid has control points (elastic_grid - 1) cells apart; a Gaussian of half a
        # cell gives a field with about the same correlation length.
        sigma = max(1.0, 0.5 * size / max(1, cfg.elastic_grid - 1))
        alpha = cfg.elastic_alpha * size / _elastic_scale(h, w, sigma)
        steps.append(A.ElasticTransform(alpha=alpha, sigma=sigma, noise_distribution="uniform",
                                        border_mode=cv2.BORDER_REPLICATE, p=cfg.p_elastic))
    if cfg.p_blur > 0:
        steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=tuple(cfg.blur_sigma), p=cfg.p_blur))
    if cfg.p_intensity > 0:
        steps.append(WindowIntensity(channels, cfg.brightness, cfg.contrast, tuple(cfg.gamma), p=cfg.p_intensity))
    if cfg.p_noise > 0 and cfg.noise_std > 0:
        steps.append(A.GaussNoise(std_range=(cfg.noise_std, cfg.noise_std), p=cfg.p_noise))
    return A.Compose(steps)


class CpuAugment:
    """uint8 (K, C, H, W) -> uint8 (K, C, H, W), one set of random parameters per volume."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self._pipelines: dict[tuple[int, int, int], A.Compose] = {}

    def __call__(self, volume: np.ndarray, rng: np.random.Generator | int) -> np.ndarray:
        if not self.cfg.enabled:
            return volume
        k, c, h, w = volume.shape
        key = (h, w, c)
        if key not in self._pipelines:
            self._pipelines[key] = _pipeline(self.cfg, h, w, c)
        pipe = self._pipelines[key]
        seed = int(rng) if isinstance(rng, (int, np.integer)) else int(rng.integers(2**31))
        # One shared stream for all steps: Compose.set_random_seed would give each step its own
        # generator with the same seed, so e.g. every step's apply/skip coin would come out equal.
        pipe.set_random_state(np.random.default_rng(seed), random.Random(seed))
        image = np.ascontiguousarray(volume.reshape(k * c, h, w).transpose(1, 2, 0))
        out = pipe(image=image)["image"]
        return np.ascontiguousarray(out.transpose(2, 0, 1)).reshape(k, c, h, w)


def build_cpu_augment(cfg: AugmentConfig) -> CpuAugment:
    """The CPU augmentation for `cfg`: call it as `aug(volume_uint8_KCHW, rng_or_seed)`."""
    return CpuAugment(cfg)


__all__ = ["CpuAugment", "WindowIntensity", "build_cpu_augment"]
