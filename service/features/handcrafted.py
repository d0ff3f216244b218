"""HSV colour histograms and 64-bit perceptual hashes (pHash), from decoded PIL images."""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

# Hue carries most of a garment's colour; saturation and value are coarser so that lighting
# changes move an image to a neighbouring bin at most.
HSV_BINS = (16, 4, 4)
PHASH_SIZE = 32  # the image is reduced to 32 x 32 before the DCT
PHASH_KEEP = 8  # the 8 x 8 lowest frequencies make the 64 bits


def hsv_histogram(img: Image.Image, bins: tuple[int, int, int] = HSV_BINS) -> np.ndarray:
    """The L1-normalised joint HSV histogram (16 x 4 x 4 = 256 bins) of an image."""
    small = img.convert("RGB")
    small.thumbnail((256, 256))  # the histogram of a thumbnail is the same up to noise
    hsv = np.asarray(small.convert("HSV"), dtype=np.int64).reshape(-1, 3)
    idx = [(hsv[:, c] * bins[c]) // 256 for c in range(3)]
    flat = (idx[0] * bins[1] + idx[1]) * bins[2] + idx[2]
    hist = np.bincount(flat, minlength=bins[0] * bins[1] * bins[2]).astype(np.float32)
    return hist / max(float(hist.sum()), 1.0)


def chi_square(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chi-square distance 1/2 sum (a-b)^2/(a+b) between histograms (broadcasts over rows)."""
    total = a + b
    return 0.5 * np.sum(np.where(total > 0, (a - b) ** 2 / np.where(total > 0, total, 1), 0),
                        axis=-1)


@cache
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


def phash(img: Image.Image) -> np.ndarray:
    """64-bit perceptual hash: signs of the 8 x 8 lowest DCT frequencies against their median."""
    grey = img.convert("L").resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    d = _dct_matrix(PHASH_SIZE)
    low = (d @ pixels @ d.T)[:PHASH_KEEP, :PHASH_KEEP].ravel()
    # The DC term is the mean brightness: leaving it out of the median keeps the bits about
    # structure, so a brighter copy hashes the same.
    return low > np.median(low[1:])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between bool codes (broadcasts over rows)."""
    return np.count_nonzero(a != b, axis=-1)


def decode_rgb(data: bytes, *, max_pixels: int) -> Image.Image:
    """Untrusted bytes -> an oriented RGB image, decoded in full like the calibration run."""
    from service.images.decode import open_image, to_rgb

    # No JPEG draft decoding: thresholds (docs/hashing.md) were calibrated on full decodes,
    # and pHash bits near the median flip under the draft's coarser DCT scaling.
    return to_rgb(open_image(data, max_pixels=max_pixels))
