"""cttrain.augment (torch, on the batch) and cttrain.augment_cpu (albumentations, per volume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cttrain.augment import DeviceAugment, mix_batch
from cttrain.augment_cpu import build_cpu_augment
from cttrain.config import AugmentConfig

OFF = dict(p_affine=0.0, hflip=0.0, p_elastic=0.0, p_intensity=0.0, p_noise=0.0, p_blur=0.0)
STRONG = dict(p_affine=1.0, hflip=0.5, p_elastic=1.0, p_intensity=1.0, p_noise=0.0, p_blur=1.0, rotate_deg=20.0)


def cfg(**kw) -> AugmentConfig:
    return AugmentConfig(**{**OFF, **kw})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_batch(b=4, k=3, c=3, h=24, w=20, seed=0) -> torch.Tensor:
    """Smooth images (so interpolation changes them little) with values well inside (0, 1)."""
    g = gen(seed)
    coarse = torch.rand(b * k, c, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (0.1 + 0.8 * x).view(b, k, c, h, w)


def identical_slices(b=3, k=4, c=3, h=24, w=20) -> torch.Tensor:
    return smooth_batch(b, 1, c, h, w).expand(b, k, c, h, w).contiguous()


# ---------------------------------------------------------------------------------- DeviceAugment


def test_all_probabilities_zero_is_the_identity():
    x = smooth_batch()
    assert torch.equal(DeviceAugment(cfg())(x, gen()), x)
    assert torch.equal(DeviceAugment(AugmentConfig(enabled=False))(x, gen()), x)


@pytest.mark.parametrize("kw", [{}, STRONG, {**STRONG, "p_noise": 1.0}])
def test_shape_dtype_range_and_change(kw):
    x = smooth_batch()
    y = DeviceAugment(AugmentConfig(**kw))(x, gen())
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.equal(y, x)


def test_same_seed_same_output_other_seed_other_output():
    aug = DeviceAugment(AugmentConfig(**{**STRONG, "p_noise": 1.0}))
    x = smooth_batch()
    assert torch.equal(aug(x, gen(3)), aug(x, gen(3)))
    assert not torch.equal(aug(x, gen(3)), aug(x, gen(4)))


def test_input_is_not_modified():
    x = smooth_batch()
    before = x.clone()
    DeviceAugment(AugmentConfig(**{**STRONG, "p_noise": 1.0}))(x, gen())
    assert torch.equal(x, before)


def test_one_transform_shared_by_all_slices_of_a_volume():
    x = identical_slices()
    y = DeviceAugment(AugmentConfig(**STRONG))(x, gen(1))
    assert not torch.equal(y, x)
    for s in range(1, x.shape[1]):
        assert torch.equal(y[:, s], y[:, 0])
    assert not torch.allclose(y[0, 0], y[1, 0])  # volumes get their own transforms


def test_flip_and_identity_affine_are_exact_geometry():
    x = smooth_batch()
    flipped = DeviceAugment(cfg(hflip=1.0))(x, gen())
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)
    still = DeviceAugment(cfg(p_affine=1.0, rotate_deg=0.0, scale=[1.0, 1.0], translate=0.0))(x, gen())
    torch.testing.assert_close(still, x, atol=1e-5, rtol=0)


def test_translation_moves_content_by_the_configured_fraction():
    x = torch.zeros(1, 1, 1, 40, 40)
    x[..., 18:22, 18:22] = 1.0
    y = DeviceAugment(cfg(p_affine=1.0, rotate_deg=0.0, scale=[1.0, 1.0], translate=0.1))(x, gen(2))
    ys, xs = torch.nonzero(y[0, 0, 0] > 0.5, as_tuple=True)
    shift = (ys.float().mean() - 19.5).abs().item(), (xs.float().mean() - 19.5).abs().item()
    assert max(shift) > 0.5 and all(s <= 4.0 + 0.5 for s in shift)  # at most 10% of 40 pixels


def test_each_augmentation_applies_with_its_probability():
    x = smooth_batch(b=64, k=1, c=1, h=12, w=12)
    y = DeviceAugment(cfg(p_affine=0.5))(x, gen())
    unchanged = torch.tensor([torch.equal(y[i], x[i]) for i in range(64)])
    assert 16 < int(unchanged.sum()) < 48


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (B, K, C, H, W) as `cttrain.data.to_device` hands it on CUDA: a view of channels-last slices."""
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)


def test_channels_last_layout_survives_augmentation_and_mixing():
    """The model takes channels-last slices without a copy only if augmentation keeps that layout."""
    half = dict(p_affine=0.5, hflip=0.5, p_elastic=0.5, p_intensity=0.5, p_noise=0.5, p_blur=0.5)
    mix = dict(mixup_alpha=0.4, cutmix_alpha=1.0, mixup_p=1.0)
    configs = [AugmentConfig(**{**STRONG, "p_noise": 1.0, **mix}), AugmentConfig(**{**half, **mix})]
    kept = 0
    for seed in range(50):
        for c in configs:
            x, y = smooth_batch(seed=seed), torch.rand(4, 3, generator=gen(seed))
            outputs = []
            for batch in (channels_last(x), x):
                g = gen(seed)  # one generator for both steps, as in Trainer._augment
                outputs.append(mix_batch(DeviceAugment(c)(batch, g), y, c, g)[0])
            out, ref = outputs
            kept += out.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # same pixels, other memory order
    assert kept == 100


# ---------------------------------------------------------------------------------- mix_batch


def test_mixup_targets_are_convex_combinations():
    b = 8
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, 2, 1, 4, 4) / b
    y = torch.eye(b)[:, :6] + torch.eye(b).roll(1, 1)[:, :6]  # distinct multi-hot rows
    xm, ym = mix_batch(x, y, cfg(mixup_alpha=0.4, mixup_p=1.0), gen(5))
    assert float(ym.min()) >= 0.0 and float(ym.max()) <= 1.0
    torch.testing.assert_close(ym.sum(0), y.sum(0))  # a permutation of the batch is mixed in
    lams = set()
    for i in range(b):
        v = float(xm[i, 0, 0, 0, 0]) * b  # = lam * i + (1 - lam) * partner
        candidates = [(j, 1.0 if j == i else (v - j) / (i - j)) for j in range(b)]
        matches = [round(lam, 4) for j, lam in candidates if -1e-5 <= lam <= 1 + 1e-5
                   and abs(lam * i + (1 - lam) * j - v) < 1e-4
                   and torch.allclose(ym[i], lam * y[i] + (1 - lam) * y[j], atol=1e-5)]
        assert matches, f"sample {i} is not a convex combination of two batch samples"
        lams.update(m for m in matches if m != 1.0)
    assert len(lams) <= 1  # one lambda for the batch


def test_mix_off_or_not_drawn_returns_the_batch():
    x, y = smooth_batch(), torch.rand(4, 3)
    for c in (cfg(), cfg(mixup_alpha=0.4, mixup_p=0.0)):
        xm, ym = mix_batch(x, y, c, gen())
        assert xm is x and ym is y


def test_cutmix_label_weight_is_the_kept_area():
    b, h, w = 6, 16, 16
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, 3, 1, h, w).contiguous()
    y = torch.eye(b)
    for seed in range(5):
        xm, ym = mix_batch(x, y, cfg(cutmix_alpha=1.0, mixup_p=1.0), gen(seed))
        for i in range(b):
            kept = (xm[i] == i).float().mean(dim=(-1, -2, -3))  # per slice
            assert torch.allclose(kept, kept[0].expand_as(kept))  # the same box in every slice
            torch.testing.assert_close(ym[i, i], kept[0])
            assert abs(float(ym[i].sum()) - 1.0) < 1e-5


# ---------------------------------------------------------------------------------- albumentations


def uint8_volume(k=4, c=3, h=24, w=20, identical=False):
    x = identical_slices(1, k, c, h, w)[0] if identical else smooth_batch(1, k, c, h, w)[0]
    return (x * 255).round().to(torch.uint8).numpy()


def test_cpu_pipeline_shape_dtype_and_seed():
    aug = build_cpu_augment(AugmentConfig(**{**STRONG, "p_noise": 1.0}))
    v = uint8_volume()
    out = aug(v, 11)
    assert out.shape == v.shape and out.dtype == np.uint8
    assert not np.array_equal(out, v)
    np.testing.assert_array_equal(out, aug(v, 11))
    np.testing.assert_array_equal(aug(v, np.random.default_rng(2)), aug(v, np.random.default_rng(2)))
    assert not np.array_equal(out, aug(v, 12))


def test_cpu_pipeline_shares_parameters_across_slices():
    v = uint8_volume(identical=True)
    for seed in range(3):
        out = build_cpu_augment(AugmentConfig(**STRONG))(v, seed)
        assert not np.array_equal(out, v)
        for s in range(1, v.shape[0]):
            np.testing.assert_array_equal(out[s], out[0])


def test_cpu_pipeline_identity_and_flip_match_the_device_path():
    v = uint8_volume()
    np.testing.assert_array_equal(build_cpu_augment(cfg())(v, 0), v)
    np.testing.assert_array_equal(build_cpu_augment(cfg(hflip=1.0))(v, 0), v[..., ::-1])


def test_cpu_contrast_keeps_each_window_mean():
    v = uint8_volume()
    out = build_cpu_augment(cfg(p_intensity=1.0, brightness=0.0, contrast=0.3, gamma=[1.0, 1.0]))(v, 4)
    assert not np.array_equal(out, v)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), v.mean(axis=(0, 2, 3)), atol=1.0)
