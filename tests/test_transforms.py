"""Resize + centre crop geometry, label safety, backbone normalisation and photometric views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricAugmentation,
    normalize_crops,
    open_dataset,
    photometric_view,
    prepare_crop,
    prepare_label,
    resize_shorter_center_crop,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def three_bands(width: int, height: int) -> Image.Image:
    """Red first quarter, green middle half, blue last quarter, along the longer side."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    long = max(width, height)
    bands = [(0, long // 4, RED), (long // 4, 3 * long // 4, GREEN), (3 * long // 4, long, BLUE)]
    for start, stop, colour in bands:
        if width >= height:
            pixels[:, start:stop] = colour
        else:
            pixels[start:stop, :] = colour
    return Image.fromarray(pixels)


@pytest.mark.parametrize("width, height", [(400, 100), (100, 400)])
def test_shorter_side_is_scaled_and_the_centre_kept(width, height):
    crop = prepare_crop(three_bands(width, height), 48)
    assert crop.shape == (48, 48, 3) and crop.dtype == np.uint8
    # the shorter side becomes 48, the longer one 192: the centred 48 pixels lie inside the green half
    np.testing.assert_array_equal(crop, np.broadcast_to(np.array(GREEN, dtype=np.uint8), crop.shape))


@pytest.mark.parametrize("width, height", [(100, 80), (80, 100)])
def test_crop_is_centred_on_the_longer_side_and_spans_the_shorter(width, height):
    columns, rows = np.meshgrid(np.arange(width), np.arange(height))
    for coordinate, along_longer in ((columns, width > height), (rows, height > width)):
        label = prepare_label(coordinate.astype(np.uint8), 40)
        line = label[0, :] if coordinate is columns else label[:, 0]
        extent = coordinate.max()
        assert np.all(np.diff(line.astype(int)) == 2)  # scale ½ everywhere, nearest neighbour
        if along_longer:
            assert abs(int(line[0]) - (extent - int(line[-1]))) <= 1  # as much cut on both ends
            assert line[0] > 2
        else:
            assert line[0] <= 1 and line[-1] >= extent - 1  # the whole shorter side survives


def test_resize_shorter_center_crop_keeps_mode_and_upsamples_small_images():
    small = Image.new("L", (30, 20), 7)
    crop = resize_shorter_center_crop(small, 64, Image.Resampling.BILINEAR)
    assert crop.mode == "L" and crop.size == (64, 64)
    assert np.all(np.asarray(crop) == 7)
    with pytest.raises(ValueError):
        resize_shorter_center_crop(small, 0, Image.Resampling.BILINEAR)


def test_labels_stay_nearest_without_new_values():
    rng = np.random.default_rng(3)
    values = np.array([0, 3, 7, 26, 255], dtype=np.uint8)
    label = values[rng.integers(0, len(values), (237, 311))]
    for size in (40, 320):
        resized = prepare_label(label, size)
        assert resized.shape == (size, size) and resized.dtype == np.uint8
        assert set(np.unique(resized)) <= set(values.tolist())
    with pytest.raises(ValueError):
        prepare_label(label.astype(np.int64), 40)


def test_prepare_crop_on_a_real_photo_converts_to_rgb():
    photo = open_dataset("sample", None, "train").load_image(0)
    crop = prepare_crop(photo.convert("L"), 56)
    assert crop.shape == (56, 56, 3)
    np.testing.assert_array_equal(crop[..., 0], crop[..., 2])


def test_normalize_crops_matches_a_hand_computation():
    crops = np.zeros((2, 3, 4, 3), dtype=np.uint8)
    crops[1, 2, 3] = (0, 128, 255)
    crops[0, 0, 0] = (51, 102, 204)
    batch = normalize_crops(crops)
    assert batch.shape == (2, 3, 3, 4) and batch.dtype == torch.float32 and batch.is_contiguous()
    expected = [(0 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (255 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(batch[1, :, 2, 3].numpy(), expected, rtol=1e-6)
    expected = [(0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224, (0.8 - 0.406) / 0.225]
    np.testing.assert_allclose(batch[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    zero = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(batch[0, :, 1, 1].numpy(), zero, rtol=1e-6)
    with pytest.raises(ValueError):
        normalize_crops(crops[0])


@pytest.fixture(scope="module")
def photo_crop() -> np.ndarray:
    return prepare_crop(open_dataset("sample", None, "train").load_image(0), 64)


def test_photometric_view_is_reproducible_from_the_seed(photo_crop):
    before = photo_crop.copy()
    views = [photometric_view(photo_crop, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    for view in views:
        assert view.shape == photo_crop.shape and view.dtype == np.uint8
    np.testing.assert_array_equal(views[0], views[1])
    assert not np.array_equal(views[0], views[2])
    np.testing.assert_array_equal(photo_crop, before)
    rng = np.random.default_rng(5)
    assert not np.array_equal(photometric_view(photo_crop, rng), photometric_view(photo_crop, rng))


def test_photometric_view_branches(photo_crop):
    blur_only = PhotometricAugmentation(blur_sigma=(2.0, 2.0), jitter_p=0.0, grayscale_p=0.0)
    blurred = photometric_view(photo_crop, np.random.default_rng(0), blur_only).astype(float)
    sharpness = np.abs(np.diff(photo_crop.astype(float), axis=1)).mean()
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.8 * sharpness

    grayscale_only = PhotometricAugmentation(jitter_p=0.0, grayscale_p=1.0)
    gray = photometric_view(photo_crop, np.random.default_rng(0), grayscale_only)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 1], gray[..., 2])

    always_jitter = PhotometricAugmentation(blur_sigma=(2.0, 2.0), jitter_p=1.0, jitter_strength=0.3)
    jittered = photometric_view(photo_crop, np.random.default_rng(0), always_jitter).astype(float)
    assert np.abs(jittered - blurred).mean() > 1.0
    assert np.abs(jittered[..., 0] - jittered[..., 2]).mean() > 1.0  # jitter keeps colour

    with pytest.raises(ValueError):
        photometric_view(photo_crop[..., 0], np.random.default_rng(0))
