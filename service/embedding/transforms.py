"""Pure preprocessing for models: resize, crop, normalise, batch (decoding: images.decode)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.images.decode import open_image, to_rgb
from service.images.limits import decode_slot


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: square crop of `size` from a shorter side of `resize`."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Longer side over shorter side beyond which the long side is cut before resizing (the final
# square keeps only the centre anyway).
MAX_ASPECT = 4


def resize_and_crop(img: Image.Image, *, resize: int, size: int) -> Image.Image:
    """Resize so the shorter side is `resize`, then take the central `size` square."""
    width, height = img.size
    short = min(width, height)
    if max(width, height) > MAX_ASPECT * short:
        # Only the centre survives the crop: resizing all of a 1 x 65,535 strip would make it
        # 256 x 16.8 M pixels (13 GB). Cut the long side first, far outside the final square.
        keep = MAX_ASPECT * short
        left, top = (width - min(width, keep)) // 2, (height - min(height, keep)) // 2
        img = img.crop((left, top, left + min(width, keep), top + min(height, keep)))
        width, height = img.size
    scale = resize / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def normalise(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32, (x/255 - mean) / std."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1)


def preprocess(data: bytes, prep: Preprocessing, *, max_pixels: int) -> np.ndarray:
    """Bytes of one image -> the model's CHW float32 input."""
    # The slot covers the conversions too: they are what a large image costs beyond its decode.
    with decode_slot():
        img = open_image(data, max_pixels=max_pixels, draft_size=prep.resize)
        img = resize_and_crop(to_rgb(img), resize=prep.resize, size=prep.size)
        return normalise(img, prep)


def batch(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack CHW arrays into one contiguous NCHW batch."""
    return np.ascontiguousarray(np.stack(arrays, axis=0))
