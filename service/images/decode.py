"""Safe decoding of untrusted image bytes: formats, bombs, truncation, orientation, RGB."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from pillow_heif import register_heif_opener

from service.images.jpeg import JpegStructureError, check_scan_covers_frame
from service.images.limits import decode_slot, setting

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


# Decoders hand over images in bands of about this many source rows, so that converting or
# reducing a large image allocates only its result in full.
BAND_ROWS = 256
EXIF_ORIENTATION = 0x0112
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def bytes_per_pixel(mode: str) -> int:
    """What Pillow allocates per pixel of `mode` (RGB is stored as 4 bytes)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def oriented(width: int, height: int, orientation: object) -> tuple[int, int]:
    """A size after the EXIF orientation: 5-8 turn the image by a quarter."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def image_header(data: bytes) -> tuple[str, int, int]:
    """Format and full-resolution size after EXIF orientation, from the header alone."""
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
        if img.format == "TIFF":  # Pillow's TIFF plugin reports the oriented size itself
            return "TIFF", img.width, img.height
        return (img.format or "JPEG", *oriented(*img.size, _orientation(img)))


def _orientation(img: Image.Image) -> object:
    # A broken EXIF block must not reject an otherwise good image.
    with contextlib.suppress(OSError, ValueError, SyntaxError, TypeError, KeyError):
        return img.getexif().get(EXIF_ORIENTATION, 1)
    return 1


@dataclass
class Decoded:
    """A decoded upload: pixels (reduced when asked), format, and its oriented full size."""

    image: Image.Image
    format: str
    width: int
    height: int


def _too_large(max_pixels: int) -> ImageDecodeError:
    return ImageDecodeError("image_too_large",
                            f"the image has more pixels than the limit of {max_pixels}")


def decode(data: bytes, *, max_pixels: int, draft_size: int | None = None,
           max_decoded_bytes: int | None = None) -> Decoded:
    """Open and fully decode untrusted bytes, refusing bombs, odd formats and truncation.

    With `draft_size`, the image comes back reduced (JPEGs by DCT scaling, others by box
    averaging into RGB) to the smallest size whose shorter side still covers it. Only the
    first frame of animated and multi-page files is decoded.
    """
    with decode_slot():
        return _decode(data, max_pixels=max_pixels, draft_size=draft_size,
                       max_bytes=max_decoded_bytes or setting("MAX_DECODED_BYTES"))


def _decode(data: bytes, *, max_pixels: int, draft_size: int | None,
            max_bytes: int) -> Decoded:
    if not data:
        raise ImageDecodeError("empty_file", "the file is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _too_large(max_pixels) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(
            "not_an_image",
            "the file is not an image in a supported format "
            "(JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF)",
        ) from exc
    fmt = img.format or "JPEG"
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError("invalid_image", "the image has no pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "image_too_large",
            f"the image has {width}x{height} pixels, more than the limit of {max_pixels}",
        )
    if fmt in ("JPEG", "MPO"):
        try:
            check_scan_covers_frame(data, width, height)
        except JpegStructureError as exc:
            raise ImageDecodeError(exc.code, str(exc)) from exc
    try:
        if draft_size and fmt in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
        # Checked after the draft: that is what the decoder allocates.
        decoded_bytes = img.width * img.height * bytes_per_pixel(img.mode)
        if decoded_bytes > max_bytes:
            raise ImageDecodeError(
                "image_too_large",
                f"the image's {width}x{height} {img.mode} pixels need {decoded_bytes} bytes "
                f"decoded, more than the limit of {max_bytes}")
        img.load()
        loaded = img.size
        with contextlib.suppress(OSError, ValueError, SyntaxError, TypeError, KeyError):
            ImageOps.exif_transpose(img, in_place=True)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise _too_large(max_pixels) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError("corrupt_image", f"the image could not be decoded: {exc}") from exc
    if img.size != loaded:
        width, height = height, width
    if draft_size and min(img.size) >= 2 * draft_size:
        img = _by_bands(img, factor=min(img.size) // draft_size)
    return Decoded(img, fmt, width, height)


def open_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """The pixels of `decode`: oriented, reduced to about `draft_size` when given."""
    return decode(data, max_pixels=max_pixels, draft_size=draft_size).image


def _scale_top(img: Image.Image) -> float:
    """The value that maps to 255 when a high-depth image becomes 8-bit grey."""
    low, high = img.getextrema()  # type: ignore[misc]
    if img.mode == "F":
        return max(float(high), 1.0)
    return 65535.0 if img.mode.startswith("I;16") or float(high) > 255 else 255.0


def _band_to_rgb(band: Image.Image, top: float) -> Image.Image:
    mode = band.mode
    if mode in HIGH_DEPTH_MODES:
        # Pillow cannot convert these straight to RGB; scale to 8 bits by the type's range.
        arr = np.asarray(band, dtype=np.float32)
        band = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        band = band.convert("RGBA" if "transparency" in band.info else "RGB")
        mode = band.mode
    if mode in TRANSPARENT_MODES:
        # Transparent areas become white, as on a product photo's background.
        rgba = band.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        band = Image.alpha_composite(background, rgba)
    return band.convert("RGB") if band.mode != "RGB" else band


def _by_bands(img: Image.Image, *, factor: int = 1) -> Image.Image:
    """RGB of `img`, box-reduced by `factor`, converted band by band."""
    top = _scale_top(img) if img.mode in HIGH_DEPTH_MODES else 255.0
    width, height = img.size
    step = factor * max(1, BAND_ROWS // factor)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for y in range(0, height, step):
        band = _band_to_rgb(img.crop((0, y, width, min(height, y + step))), top)
        out.paste(band.reduce(factor) if factor > 1 else band, (0, y // factor))
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and bring any mode (P, L, LA, RGBA, CMYK, 16-bit) to RGB."""
    with contextlib.suppress(OSError, ValueError, SyntaxError, TypeError, KeyError):
        # In place: `open_image` has applied it already, and a copy would double the memory.
        ImageOps.exif_transpose(img, in_place=True)
    if img.mode == "RGB":
        return img
    if img.mode in ("L", "CMYK", "YCbCr", "1"):
        return img.convert("RGB")
    return _by_bands(img)
