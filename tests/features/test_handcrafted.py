"""pHash and HSV histograms on a real photo and its edits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from service.features.handcrafted import chi_square, hamming, hsv_histogram, phash


def test_phash_survives_resizing_and_brightness_but_not_rotation(photos: list[Path]) -> None:
    with Image.open(photos[0]) as img:
        img = img.convert("RGB")
        code = phash(img)
        assert code.shape == (64,) and code.dtype == bool
        small = img.resize((img.width * 3 // 10, img.height * 3 // 10))
        brighter = ImageEnhance.Brightness(img).enhance(1.3)
        assert hamming(code, phash(small)) <= 4
        assert hamming(code, phash(brighter)) <= 8
        assert hamming(code, phash(img.transpose(Image.Transpose.ROTATE_90))) > 16
    with Image.open(photos[5]) as other:
        assert hamming(code, phash(other.convert("RGB"))) > 16


def test_hsv_histogram_is_a_distribution_and_flip_invariant(photos: list[Path]) -> None:
    with Image.open(photos[1]) as img:
        img = img.convert("RGB")
        hist = hsv_histogram(img)
        assert hist.shape == (256,) and np.isclose(hist.sum(), 1.0)
        flipped = hsv_histogram(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        assert float(chi_square(hist, flipped)) < 0.01
    with Image.open(photos[7]) as other:
        assert float(chi_square(hist, hsv_histogram(other.convert("RGB")))) > 0.05
