"""ADM center crop (method.md §7) against hand computations."""

import io

import numpy as np
import pytest
from PIL import Image

from epg.data.adm_crop import adm_center_crop, encode_image


def test_box_halving_and_center_crop_by_hand():
    # 4x6 (H x W) image, res 2: short side 4 >= 2*2 -> one BOX halving to 2x3 (means of 2x2 blocks, all exact),
    # then scale 2/2 = 1 (no change), then the center crop keeps columns (3 - 2) // 2 = 0 .. 1.
    block_means = np.array([[10, 50, 90], [130, 170, 210]])
    offsets = np.array([[-3, -1], [1, 3]])  # each 2x2 block averages to its mean exactly
    pixels = np.kron(block_means, np.ones((2, 2), dtype=int)) + np.tile(offsets, (2, 3))
    image = Image.fromarray(np.repeat(pixels[..., None], 3, axis=2).astype(np.uint8))
    out = np.asarray(adm_center_crop(image, 2))
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], [[10, 50], [130, 170]])


def test_repeated_halving_then_bicubic_then_crop():
    # 40x90 image, res 8: 40 >= 16 -> 20x45, 20 >= 16 -> 10x22; 10 < 16 stops. Scale 8/10 -> 8 x round(17.6)=18,
    # crop offset (18 - 8) // 2 = 5.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))
    step = image.resize((45, 20), Image.BOX).resize((22, 10), Image.BOX).resize((18, 8), Image.BICUBIC)
    expected = np.asarray(step)[:, 5:13]
    np.testing.assert_array_equal(np.asarray(adm_center_crop(image, 8)), expected)


def test_upscale_small_image_to_resolution():
    # MNIST-like 28x28 -> 32: no halving, bicubic up to 32x32, nothing to crop.
    image = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).convert("RGB")
    out = adm_center_crop(image, 32)
    assert out.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image.resize((32, 32), Image.BICUBIC)))


def test_rejects_non_positive_resolution():
    with pytest.raises(ValueError, match="positive"):
        adm_center_crop(Image.new("RGB", (8, 8)), 0)


def test_png_is_lossless_and_jpeg_decodes():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    png = Image.open(io.BytesIO(encode_image(image, "png")))
    np.testing.assert_array_equal(np.asarray(png), np.asarray(image))
    assert Image.open(io.BytesIO(encode_image(image, "jpg"))).format == "JPEG"
    with pytest.raises(ValueError, match="png"):
        encode_image(image, "gif")
