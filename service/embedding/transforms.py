"""Pure preprocessing: decode, orient, convert, resize, crop, normalise, batch."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from pillow_heif import register_heif_opener

# Formats accepted as uploads; SVG and PDF are not images Pillow decodes safely, so refused.
# (Multi-picture JPEGs open through the JPEG plugin and report "MPO"; HEIC/HEIF photos from
# phones open through pillow-heif.)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF")

register_heif_opener()


class ImageDecodeError(ValueError):
    """The bytes are not an image this service accepts; `code` names the reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: square crop of `size` from a shorter side of `resize`."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def open_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode untrusted bytes, refusing bombs, odd formats and truncation.

    With `draft_size`, JPEGs decode at the smallest DCT scale whose shorter side still
    covers it, which is several times faster for camera photos.
    """
    if not data:
        raise ImageDecodeError("empty_file", "the file is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            "image_too_large", f"the image has more pixels than the limit of {max_pixels}"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(
            "not_an_image",
            "the file is not an image in a supported format "
            "(JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF)",
        ) from exc
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError("invalid_image", "the image has no pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "image_too_large",
            f"the image has {width}x{height} pixels, more than the limit of {max_pixels}",
        )
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            "image_too_large", f"the image has more pixels than the limit of {max_pixels}"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError("corrupt_image", f"the image could not be decoded: {exc}") from exc
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and bring any mode (P, L, LA, RGBA, CMYK, 16-bit) to RGB."""
    # A broken EXIF block must not reject an otherwise good image.
    with contextlib.suppress(OSError, ValueError, SyntaxError, TypeError, KeyError):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow cannot convert these straight to RGB; scale to 8 bits by the type's range.
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            top = max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas become white, as on a product photo's background.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_and_crop(img: Image.Image, *, resize: int, size: int) -> Image.Image:
    """Resize so the shorter side is `resize`, then take the central `size` square."""
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
    img = open_image(data, max_pixels=max_pixels, draft_size=prep.resize)
    img = resize_and_crop(to_rgb(img), resize=prep.resize, size=prep.size)
    return normalise(img, prep)


def batch(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack CHW arrays into one contiguous NCHW batch."""
    return np.ascontiguousarray(np.stack(arrays, axis=0))
