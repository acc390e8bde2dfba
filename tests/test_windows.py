"""Window math (exact grey levels at the edges), channel order, CLAHE per slice, QC flags."""

import cv2
import numpy as np
import pytest

from ctprep.config import Window
from ctprep.quality import check_hu, check_volume, check_windows, hu_stats
from ctprep.windows import (
    apply_clahe,
    window_bounds,
    window_reference,
    window_to_uint8,
    windows_to_channels,
)

LUNG = Window("lung", -600.0, 1500.0)          # -1350 .. 150 HU
MEDIASTINUM = Window("mediastinum", 40.0, 400.0)  # -160 .. 240 HU


def test_window_edges_map_to_0_and_255_exactly():
    lo, hi = window_bounds(LUNG.center, LUNG.width)
    assert (lo, hi) == (-1350.0, 150.0)
    hu = np.array([-3000, lo - 1, lo, hi, hi + 1, 3000], dtype=np.float32)
    np.testing.assert_array_equal(window_to_uint8(hu, LUNG.center, LUNG.width), [0, 0, 0, 255, 255, 255])


def test_window_is_linear_between_edges():
    lo, _ = window_bounds(MEDIASTINUM.center, MEDIASTINUM.width)
    levels = np.array([0, 1, 2, 64, 127, 128, 200, 254, 255])
    hu = (lo + levels * MEDIASTINUM.width / 255.0).astype(np.float32)
    np.testing.assert_array_equal(window_to_uint8(hu, MEDIASTINUM.center, MEDIASTINUM.width), levels)
    # rounding to nearest: a quarter level below/above still gives the level
    quarter = MEDIASTINUM.width / 255.0 / 4
    np.testing.assert_array_equal(window_to_uint8(hu[1:-1] - quarter, 40.0, 400.0), levels[1:-1])
    np.testing.assert_array_equal(window_to_uint8(hu[1:-1] + quarter, 40.0, 400.0), levels[1:-1])


def test_fast_window_matches_the_reference_formula():
    hu = np.random.default_rng(0).uniform(-2000, 2000, size=(7, 33, 35)).astype(np.float32)
    fast = window_to_uint8(hu, LUNG.center, LUNG.width)
    ref = window_reference(hu, LUNG.center, LUNG.width)
    assert fast.shape == hu.shape and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - ref).max() <= 1   # float32 vs float64 at exact .5 ties only
    assert (fast == ref).mean() > 0.9999


def test_window_rejects_non_positive_width():
    with pytest.raises(ValueError, match="width"):
        window_to_uint8(np.zeros(3, np.float32), 0.0, 0.0)


def test_windows_become_channels_in_config_order():
    hu = np.full((2, 4, 5), -550.0, dtype=np.float32)   # lung: 800/1500 * 255 = 136; mediastinum: black
    hu[1] = 60.0                                         # lung: 1410/1500 * 255 = 239.7; mediastinum: 140.25
    images = windows_to_channels(hu, [LUNG, MEDIASTINUM])
    assert images.shape == (2, 2, 4, 5) and images.dtype == np.uint8
    assert (images[0, 0] == 136).all() and (images[0, 1] == 0).all()
    assert (images[1, 0] == 240).all() and (images[1, 1] == 140).all()


def _low_contrast_stack(depth: int = 3) -> np.ndarray:
    rng = np.random.default_rng(1)
    base = np.tile(np.linspace(100, 140, 64, dtype=np.float32), (64, 1))
    return np.stack([np.clip(base + rng.normal(0, 3, base.shape) + 5 * d, 0, 255)
                     for d in range(depth)]).astype(np.uint8)[:, None]          # (D, 1, H, W)


def test_clahe_keeps_shape_and_dtype_and_raises_local_contrast():
    images = _low_contrast_stack()
    before = images.copy()
    out = apply_clahe(images, clip_limit=2.0, tiles=8)
    assert out is images and out.shape == before.shape and out.dtype == np.uint8
    assert _local_std(out) > 1.5 * _local_std(before)


def _local_std(images: np.ndarray) -> float:
    """Mean standard deviation inside 8x8 blocks: local contrast, blind to slow gradients."""
    d, c, h, w = images.shape
    blocks = images.reshape(d, c, h // 8, 8, w // 8, 8).astype(float)
    return float(blocks.std(axis=(3, 5)).mean())


def test_clahe_is_per_slice_with_opencv_settings():
    images = _low_contrast_stack()
    expected = [cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(images[d, 0]) for d in range(3)]
    apply_clahe(images, clip_limit=2.0, tiles=4)
    for d in range(3):
        np.testing.assert_array_equal(images[d, 0], expected[d])


def test_clahe_clip_zero_is_a_no_op():
    images = _low_contrast_stack()
    before = images.copy()
    apply_clahe(images, clip_limit=0.0, tiles=8)
    np.testing.assert_array_equal(images, before)


def test_clahe_refuses_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        apply_clahe(np.zeros((1, 1, 8, 8), np.float32), 2.0, 8)


# ------------------------------------------------------------------------------------- QC flags


def test_constant_window_is_flagged_like_the_twice_rescaled_pipeline():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(4, 2, 64, 64), dtype=np.uint8)
    assert check_windows(images, ["lung", "mediastinum"]) == []
    images[:, 1] = 7                                     # every pixel one constant
    assert check_windows(images, ["lung", "mediastinum"]) == ["constant-window:mediastinum"]
    images[:, 0] = rng.integers(100, 102, size=(4, 64, 64))   # std < 2 grey levels
    assert check_windows(images, ["lung", "mediastinum"]) == ["constant-window:lung", "constant-window:mediastinum"]


def test_mostly_one_value_is_flagged():
    images = np.zeros((4, 1, 64, 64), np.uint8)
    images[0, 0, :4, :4] = 255                           # a few bright pixels: std > 2, mode > 99 %
    assert check_windows(images, ["wide"]) == ["constant-window:wide"]


def test_hu_histogram_flags_raw_and_unit_scaled_volumes():
    rng = np.random.default_rng(3)
    hu = np.concatenate([rng.normal(-1000, 10, 5000), rng.normal(-850, 40, 3000), rng.normal(40, 20, 4000)])
    assert check_hu(hu_stats(hu)) == []
    assert check_hu(hu_stats(hu + 1024)) == ["hu-no-air"]                 # raw units, rescale missing
    assert check_hu(hu_stats(hu - 1024)) == ["hu-no-soft-tissue"]         # rescale applied twice
    assert check_hu(hu_stats((hu + 1024) / 4000)) == ["hu-no-air"]        # scaled to [0, 1]
    assert check_hu(hu_stats(np.zeros(0))) == ["hu-empty"]


def test_check_volume_combines_both_checks():
    stats = hu_stats(np.full(1000, 0.5))
    images = np.full((2, 1, 16, 16), 9, np.uint8)
    assert check_volume(stats, images, ["lung"]) == ["hu-no-air", "constant-window:lung"]
