"""Orientation, body box, resampling plan, anti-aliasing and fixed-shape output (synthetic volumes)."""

import itertools
import json

import numpy as np
import pytest
import SimpleITK as sitk

from ctprep.config import ConfigError, PreprocessConfig, Window
from ctprep.geometry import (
    OrientationError,
    antialias,
    find_body,
    frame_of,
    plan_axis,
    reduce_volume,
    slice_weights,
)
from ctprep.hu import HURescale, VolumeMeta
from ctprep.pipeline import preprocess_image

# grey = (hu + 1024) / 16: an invertible window for reading HU back from the uint8 output
IDENTITY = Window("id", 1016.0, 4080.0)


def _image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _flipped(image: sitk.Image, axes: list[bool]) -> sitk.Image:
    """The same physical image with its voxel order reversed along `axes` (direction adjusted)."""
    out = sitk.Flip(image, axes)
    cosines = np.array(image.GetDirection()).reshape(3, 3)
    for i, flip in enumerate(axes):
        if flip:
            cosines[:, i] *= -1
    out.SetDirection(cosines.ravel().tolist())
    corner = [size - 1 if flip else 0 for size, flip in zip(image.GetSize(), axes, strict=True)]
    out.SetOrigin(image.TransformIndexToPhysicalPoint(corner))
    return out


def _phantom(shape=(40, 64, 80), seed=0) -> np.ndarray:
    """Air around an off-centre elliptic 'body' of soft tissue with a dense 'spine' and a lung hole."""
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - 34) / 22.0) ** 2 + ((x - 36) / 30.0) ** 2 < 1
    hu = np.where(body, 40, -1000).astype(np.int16)
    hu[body & (((y - 30) / 8.0) ** 2 + ((x - 46) / 9.0) ** 2 < 1)] = -850
    hu[(abs(y - 50) < 4) & (abs(x - 36) < 4)] = 700
    hu[: shape[0] // 4, :10, :10] = 300                      # asymmetric corner marker, outside the body
    return hu + np.random.default_rng(seed).integers(-5, 6, shape).astype(np.int16)


SMALL = PreprocessConfig(spacing=[2.0, 1.5, 1.5], shape=[24, 48, 56], windows=[IDENTITY], clahe_clip_limit=0.0)


# ------------------------------------------------------------------------------------ orientation


def test_oriented_view_equals_dicomorient_for_every_axis_order_and_sign():
    array = np.random.default_rng(0).integers(-1000, 1000, (3, 4, 5)).astype(np.int16)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            cosines = np.zeros((3, 3))
            for c in range(3):
                cosines[perm[c], c] = signs[c]
            image = _image(array, (0.5, 0.7, 1.3), (3.0, -4.0, 5.0), cosines.ravel().tolist())
            for code in ("LPS", "RAS", "ASL"):
                reference = sitk.DICOMOrient(image, code)
                frame = frame_of(image, code)
                view = frame.view(sitk.GetArrayViewFromImage(image))
                np.testing.assert_array_equal(view, sitk.GetArrayViewFromImage(reference))
                np.testing.assert_allclose(frame.spacing, reference.GetSpacing()[::-1])


def test_bad_orientation_code_is_an_error():
    image = _image(np.zeros((2, 2, 2), np.int16))
    for code in ("LP", "LLS", "XYZ"):
        with pytest.raises(OrientationError, match="orientation"):
            frame_of(image, code)


@pytest.mark.parametrize("axes", [[True, False, False], [False, True, True], [True, True, True]])
def test_flipped_direction_caches_the_same_image(axes):
    image = _image(_phantom(), spacing=(0.8, 0.9, 1.7), origin=(-30.0, 12.0, 100.0))
    flipped = _flipped(image, axes)
    assert not np.array_equal(sitk.GetArrayViewFromImage(flipped), sitk.GetArrayViewFromImage(image))
    cfg = PreprocessConfig(spacing=[3.0, 1.4, 1.4], shape=[16, 48, 64])
    np.testing.assert_array_equal(preprocess_image(flipped, cfg).images, preprocess_image(image, cfg).images)


def test_oblique_scan_snaps_to_the_nearest_orientation():
    angle = np.deg2rad(10)
    cosines = [np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0]
    frame = frame_of(_image(np.zeros((4, 5, 6), np.int16), direction=cosines), "LPS")
    assert frame.perm == (0, 1, 2) and frame.flip == (False, False, False)


# ------------------------------------------------------------------------------------------- body


def test_body_box_ignores_table_and_small_objects():
    hu = np.full((20, 100, 100), -1000, np.int16)
    z, y, x = np.mgrid[:20, :100, :100]
    hu[((y - 45) / 30.0) ** 2 + ((x - 50) / 40.0) ** 2 < 1] = 40        # body: y 15..75, x 10..90
    hu[:, 84:92, 2:98] = 300                                              # 8 mm table 8 mm below it
    hu[2:4, 5:8, 5:8] = 200                                               # a small cable clip
    image = _image(hu)
    frame = frame_of(image)
    body = find_body(frame.view(sitk.GetArrayViewFromImage(image)), frame, HURescale("hu"), -500.0, -1024.0)
    assert body.found
    assert body.lo[1] <= 15 and body.hi[1] >= 76                          # body rows kept ...
    assert body.hi[1] <= 84                                               # ... table rows 84..91 not
    assert body.lo[2] <= 10 and body.hi[2] >= 91                          # body columns kept ...
    assert body.lo[2] >= 4                                                # ... table/cable columns not


def test_no_body_is_reported_and_falls_back_to_the_whole_volume():
    image = _image(np.full((6, 20, 20), -1000, np.int16))
    result = preprocess_image(image, SMALL)
    assert "body-not-found" in result.info["qc_flags"]
    assert result.images.shape == (24, 1, 48, 56)


# --------------------------------------------------------------------------------------- sampling


def test_antialias_factor_and_sigma():
    assert antialias(0.6) == (1, 0.0)                 # upsampling: nothing to smooth
    assert antialias(2.0) == (2, 0.0)                 # a 2-voxel mean is the whole filter
    factor, sigma = antialias(1.4 / 0.75)
    assert factor == 2 and sigma == 0.0
    factor, sigma = antialias(3.5 / 0.75)             # downsampling a lot: mean of 4 + a Gaussian
    assert factor == 4 and sigma > 0.2
    total = (factor ** 2 - 1) / 12 + (sigma * factor) ** 2
    assert total == pytest.approx(((3.5 / 0.75 - 1) / 2) ** 2)


@pytest.mark.parametrize("n,step,out_step,out_size", [(512, 0.75, 1.4, 256), (60, 5.0, 3.0, 96),
                                                      (250, 1.5, 3.0, 96), (141, 2.0, 5.0, 32)])
def test_plan_hits_the_configured_spacing_and_centres_the_body(n, step, out_step, out_size):
    lo, hi = n // 5, n - n // 7
    plan = plan_axis(n, -100.0, step, lo, hi, out_step, out_size)
    assert (plan.stop - plan.start) % plan.factor == 0
    assert lo <= plan.start < plan.stop <= hi + plan.factor - 1   # may round up to whole blocks
    assert plan.step == pytest.approx(out_step, rel=0.01)
    centre = -100.0 + step * (lo + hi - 1) / 2
    assert abs(plan.out_origin + (out_size // 2) * plan.step - centre) <= plan.step / 2 + 1e-6


def test_slice_weights_sum_to_one():
    for n, size, sigma in [(10, 7, 0.0), (10, 7, 0.8), (5, 12, 0.0), (1, 3, 0.5)]:
        for idx, weights in slice_weights(n, size, sigma):
            assert weights.sum() == pytest.approx(1.0, abs=1e-5)
            assert idx.min() >= 0 and idx.max() < n


def test_small_structures_fade_instead_of_vanishing():
    """A 1-voxel plate downsampled 4.67x keeps roughly the same integrated signal at every phase."""
    peaks = []
    for phase in range(5):
        hu = np.zeros((8, 8, 64), np.float32)
        hu[:, :, 20 + phase] = 1000.0
        image = _image(hu, spacing=(0.75, 0.75, 0.75))
        frame = frame_of(image)
        plans = [plan_axis(8, 0.0, 0.75, 0, 8, 0.75, 8), plan_axis(8, 0.0, 0.75, 0, 8, 0.75, 8),
                 plan_axis(64, 0.0, 0.75, 0, 64, 3.5, 14)]
        out = reduce_volume(frame.view(sitk.GetArrayViewFromImage(image)), plans)
        profile = out[4, 4]
        assert profile.sum() * 3.5 == pytest.approx(1000.0 * 0.75, rel=0.1)   # signal kept
        peaks.append(profile.max())
    assert min(peaks) > 0.6 * max(peaks)             # no phase where it disappears


def test_output_has_the_configured_shape_spacing_and_physical_position():
    hu = np.full((30, 80, 90), -1000, np.int16)
    hu[5:25, 10:70, 10:80] = 40                                   # a body
    hu[12:16, 30:34, 50:54] = 1500                                # a marker at a known place
    origin = (-40.0, 25.0, 300.0)
    spacing = (0.7, 0.8, 1.5)
    image = _image(hu, spacing, origin)
    result = preprocess_image(image, SMALL)
    assert result.images.shape == (24, 1, 48, 56) and result.images.dtype == np.uint8
    out = result.info["output"]
    assert out["spacing_zyx"] == pytest.approx(SMALL.spacing, rel=0.02)
    grey = result.images[:, 0].astype(float)
    marker = np.argwhere(grey > (1000 + 1024) / 16)
    found_mm = out["origin_zyx"] + marker.mean(axis=0) * out["spacing_zyx"]
    expected_mm = np.array(origin[::-1]) + np.array([13.5, 31.5, 51.5]) * spacing[::-1]
    np.testing.assert_allclose(found_mm, expected_mm, atol=1.0)
    json.dumps(result.info)


def test_small_volume_is_padded_with_air_and_large_one_cropped():
    hu = np.full((10, 20, 20), 40, np.int16)                      # a 'body' filling its whole FOV
    padded = preprocess_image(_image(hu, (2.0, 2.0, 2.0)), SMALL).images[:, 0]
    air = round((-1024 + 1024) / 16)
    assert padded[0, 0, 0] == air and padded[-1, -1, -1] == air
    assert (padded == round((40 + 1024) / 16)).sum() > 0
    big = np.full((80, 120, 120), 40, np.int16)
    cropped = preprocess_image(_image(big, (1.0, 1.0, 1.0)), SMALL).images[:, 0]
    assert cropped.shape == (24, 48, 56)
    assert (cropped == round((40 + 1024) / 16)).all()              # body everywhere: no padding


def test_padding_below_air_is_clamped_before_averaging():
    """Padding (-3024) must give the same image as air (-1024): no dark halo where it meets tissue."""
    hu = np.full((12, 40, 40), 40, np.int16)
    hu[:, :, :13] = -1024
    padded = hu.copy()
    padded[:, :, :13] = -3024                                      # reconstruction-circle padding
    cfg = PreprocessConfig(spacing=[3.0, 3.0, 3.0], shape=[4, 16, 16], windows=[IDENTITY],
                           clahe_clip_limit=0.0, crop_body=False)
    expected = preprocess_image(_image(hu), cfg).images
    got = preprocess_image(_image(padded), cfg).images
    edge = np.unique(expected[:, 0])
    assert len(edge) > 2                                           # some voxels mix air and tissue
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------ pipeline API


def test_metadata_spacing_overrides_a_wrong_header_and_is_flagged():
    image = _image(_phantom(), spacing=(1.0, 1.0, 1.0))                # header says 1 mm (wrong)
    meta = VolumeMeta(xy_spacing=(0.8, 0.7), z_spacing=2.0)            # CSV: rows 0.8, cols 0.7
    result = preprocess_image(image, SMALL, meta)
    assert result.info["source"]["spacing_xyz"] == [0.7, 0.8, 2.0]
    assert result.info["source"]["spacing_source"] == "metadata"
    assert "spacing-header-differs-from-metadata" in result.info["qc_flags"]
    same = preprocess_image(_image(_phantom(), spacing=(0.7, 0.8, 2.0)), SMALL)
    np.testing.assert_array_equal(result.images, same.images)


def test_float_volume_with_nan_and_int32_volume():
    hu = _phantom().astype(np.float32)
    hu[0, 0, :5] = np.nan
    result = preprocess_image(_image(hu), SMALL)
    assert result.images.shape == (24, 1, 48, 56)
    as_int32 = preprocess_image(_image(_phantom().astype(np.int32)), SMALL)
    np.testing.assert_array_equal(as_int32.images, preprocess_image(_image(_phantom()), SMALL).images)


def test_invalid_config_and_non_volume_images_are_refused():
    with pytest.raises(ConfigError, match="width"):
        preprocess_image(_image(_phantom()), PreprocessConfig(windows=[Window("bad", 0.0, 0.0)]))
    with pytest.raises(ValueError, match="3D"):
        preprocess_image(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), SMALL)
