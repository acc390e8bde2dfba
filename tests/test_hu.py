"""HU rules: CT-RATE v1 (raw + CSV rescale) vs v2 (already HU), forced rules, padding clamp."""

import numpy as np
import pytest

from ctprep.hu import (
    HURescale,
    HURuleError,
    VolumeMeta,
    apply_rescale,
    clamp_padding,
    decide_rescale,
    to_hu,
)

CTRATE_META = VolumeMeta(slope=1.0, intercept=-1024.0, xy_spacing=(0.75, 0.75), z_spacing=1.5)


def _hu_volume() -> np.ndarray:
    """A tiny 'scan' in HU: air, lung, fat, soft tissue, bone."""
    return np.array([[[-1024, -850, -100], [40, 60, 700]]], dtype=np.int16)


def test_v1_raw_volume_gets_csv_rescale():
    raw = (_hu_volume().astype(np.int32) + 1024).astype(np.uint16)   # v1 stores HU + 1024
    hu, rule = to_hu(raw, CTRATE_META)
    assert rule == "raw-metadata"
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, _hu_volume().astype(np.float32))


def test_v2_hu_volume_is_left_alone_although_csv_says_minus_1024():
    hu, rule = to_hu(_hu_volume(), CTRATE_META)
    assert rule == "hu"
    np.testing.assert_array_equal(hu, _hu_volume().astype(np.float32))


def test_without_metadata_values_are_taken_as_hu():
    raw = (_hu_volume().astype(np.int32) + 1024).astype(np.uint16)
    hu, rule = to_hu(raw, None)
    assert rule == "hu"
    assert hu.min() == 0  # not shifted: nothing says by how much (QC flags such a volume: no air)


def test_positive_intercept_is_not_taken_for_a_raw_volume():
    assert decide_rescale(0.0, VolumeMeta(slope=1.0, intercept=0.0)).rule == "hu"


def test_slope_is_applied_with_intercept():
    raw = np.array([0, 100, 2048], dtype=np.uint16)
    hu, rule = to_hu(raw, VolumeMeta(slope=0.5, intercept=-1024.0))
    assert rule == "raw-metadata"
    np.testing.assert_allclose(hu, [-1024.0, -974.0, 0.0])


def test_forced_rules_override_detection():
    hu_volume = _hu_volume()
    forced_raw, rule = to_hu(hu_volume, CTRATE_META, rule="raw")
    assert rule == "raw-forced"
    np.testing.assert_array_equal(forced_raw, hu_volume.astype(np.float32) - 1024)
    raw = (hu_volume.astype(np.int32) + 1024).astype(np.uint16)
    forced_hu, rule = to_hu(raw, CTRATE_META, rule="hu")
    assert rule == "hu-forced"
    np.testing.assert_array_equal(forced_hu, raw.astype(np.float32))


def test_raw_rule_without_csv_values_is_an_error():
    with pytest.raises(HURuleError, match="RescaleIntercept"):
        decide_rescale(0.0, None, rule="raw")
    with pytest.raises(HURuleError, match="RescaleIntercept"):
        decide_rescale(0.0, VolumeMeta(slope=1.0), rule="raw")


def test_unknown_rule_and_bad_slope_are_errors():
    with pytest.raises(HURuleError, match="auto, raw, hu"):
        decide_rescale(0.0, None, rule="v1")
    with pytest.raises(HURuleError, match="positive"):
        decide_rescale(0.0, VolumeMeta(slope=0.0, intercept=-1024.0))


def test_to_stored_inverts_the_rescale():
    rescale = HURescale("raw-metadata", slope=0.5, intercept=-1024.0)
    assert rescale.to_stored(-1024.0) == 0.0
    assert rescale.to_stored(-500.0) * 0.5 - 1024.0 == -500.0


def test_apply_rescale_works_in_place_on_float32_and_copies_integers():
    rescale = HURescale("raw-metadata", 1.0, -1024.0)
    values = np.array([0.0, 1024.0], dtype=np.float32)
    assert apply_rescale(values, rescale) is values
    np.testing.assert_array_equal(values, [-1024.0, 0.0])
    stored = np.array([0, 1024], dtype=np.int16)
    out = apply_rescale(stored, rescale)
    assert out.dtype == np.float32 and stored[1] == 1024


def test_clamp_padding_turns_dicom_padding_into_air_only():
    hu = np.array([-3024, -2048, -1100, -1024, -1000, 0, 3000], dtype=np.int32)
    clamped = clamp_padding(hu, air_hu=-1024.0)
    np.testing.assert_array_equal(clamped, [-1024, -1024, -1024, -1024, -1000, 0, 3000])
    assert clamped.dtype == hu.dtype
    assert hu[0] == -3024  # input untouched
    floats = clamp_padding(np.array([-2048.5, -10.25], dtype=np.float32))
    np.testing.assert_array_equal(floats, np.array([-1024.0, -10.25], dtype=np.float32))
