"""Preprocessing as pure functions: orientation, modes, bombs, truncation, crop geometry."""

from __future__ import annotations

import io
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from service.config import PROJECT_ROOT
from service.embedding.transforms import Preprocessing, normalise, preprocess, resize_and_crop
from service.images.decode import ImageDecodeError, open_image, to_rgb

PREP = Preprocessing(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def marked() -> Image.Image:
    """A 40x20 image, red on the left half, blue on the right."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    return img


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(marked(), "PNG", exif=exif)
    img = to_rgb(open_image(data, max_pixels=10_000))
    expected_size = (20, 40) if orientation >= 5 else (40, 20)
    assert img.size == expected_size
    # The transform must be the one EXIF prescribes, checked against Pillow's reference table.
    reference = marked().transpose({2: Image.Transpose.FLIP_LEFT_RIGHT,
                                    3: Image.Transpose.ROTATE_180,
                                    4: Image.Transpose.FLIP_TOP_BOTTOM,
                                    5: Image.Transpose.TRANSPOSE,
                                    6: Image.Transpose.ROTATE_270,
                                    7: Image.Transpose.TRANSVERSE,
                                    8: Image.Transpose.ROTATE_90}[orientation]
                                   ) if orientation > 1 else marked()
    assert np.array_equal(np.asarray(img), np.asarray(reference))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    if mode == "I;16":
        src = Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16))
        data = encode(src, "PNG")
    elif mode == "CMYK":
        data = encode(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG")
    else:
        data = encode(Image.new("RGB", (30, 30), (200, 10, 10)).convert(mode),
                      "TIFF" if mode == "LA" else "PNG")
    img = to_rgb(open_image(data, max_pixels=10_000))
    assert img.mode == "RGB" and img.size == (30, 30)
    if mode == "I;16":
        assert np.asarray(img).min() == 255  # full-scale 16-bit white stays white
    if mode == "CMYK":
        r, g, b = np.asarray(img)[15, 15]
        assert r > 200 and g < 60 and b < 60


def test_transparent_pixels_become_white() -> None:
    data = encode(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), "PNG")
    assert np.asarray(to_rgb(open_image(data, max_pixels=1000))).min() == 255


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A PNG header claiming 50,000 x 50,000 pixels, with almost no data.
    png = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = b"IHDR" + (50_000).to_bytes(4, "big") * 2 + png[24:29]
    bomb = png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]
    with pytest.raises(ImageDecodeError) as err:
        open_image(bomb, max_pixels=64_000_000)
    assert err.value.code == "image_too_large"
    assert "64000000" in err.value.message


@pytest.mark.parametrize("data,code", [(b"", "empty_file"), (b"plain text", "not_an_image"),
                                       (b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                        "not_an_image"),
                                       (b"%PDF-1.4\n", "not_an_image")])
def test_non_images_are_refused(data: bytes, code: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        open_image(data, max_pixels=1000)
    assert err.value.code == code


def test_truncated_jpeg_is_refused() -> None:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError) as err:
        open_image(data[: len(data) // 2], max_pixels=1_000_000)
    assert err.value.code == "corrupt_image"


def test_resize_and_crop_geometry() -> None:
    img = resize_and_crop(Image.new("RGB", (1000, 500)), resize=256, size=224)
    assert img.size == (224, 224)
    # A centred marker stays centred.
    src = Image.new("RGB", (600, 300), (0, 0, 0))
    src.paste((255, 255, 255), (290, 140, 310, 160))
    out = np.asarray(resize_and_crop(src, resize=256, size=224)).sum(axis=2)
    ys, xs = np.nonzero(out > 300)
    assert abs(ys.mean() - 111.5) < 2 and abs(xs.mean() - 111.5) < 2


def test_normalise_and_draft_decoding_agree_with_full_decoding() -> None:
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).resize(
        (1600, 1200)).filter(__import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(8))
    data = encode(big, "JPEG", quality=95)
    fast = preprocess(data, PREP, max_pixels=10_000_000)
    full = normalise(resize_and_crop(to_rgb(Image.open(io.BytesIO(data)).convert("RGB")),
                                     resize=256, size=224), PREP)
    assert fast.shape == (3, 224, 224) and fast.dtype == np.float32
    # Draft decoding reduces the DCT scale; on a smooth photo the inputs barely differ.
    assert float(np.abs(fast - full).mean()) < 0.02


def test_heic_photos_are_supported() -> None:
    data = encode(Image.new("RGB", (64, 48), (200, 30, 30)), "HEIF")
    img = to_rgb(open_image(data, max_pixels=10_000))
    assert img.size == (64, 48)
    r, g, b = np.asarray(img)[24, 32]
    assert r > 150 and g < 80 and b < 80


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_use_their_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    img = to_rgb(open_image(out.getvalue(), max_pixels=10_000))
    r, _, b = np.asarray(img)[10, 10]
    assert r > 200 and b < 60


# --- Hostile images: decoded memory, concurrent decodes, size lies, orientation -------------

PEAK_SCRIPT = """
import resource, sys
from service.embedding.transforms import Preprocessing, preprocess
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
preprocess(data, Preprocessing(224, 256, (0.5,) * 3, (0.5,) * 3), max_pixels=64_000_000)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def hostile(mode: str, side: int) -> tuple[bytes, str]:
    """A small file of `side`^2 pixels in a wide mode (uniform, so it compresses to little)."""
    if mode == "I;16":
        return encode(Image.fromarray(np.full((side, side), 1000, np.uint16)), "PNG"), "PNG"
    if mode == "F":
        return encode(Image.new("F", (side, side), 0.5), "TIFF",
                      compression="tiff_adobe_deflate"), "TIFF"
    return encode(Image.new(mode, (side, side), (10, 20, 30, 40)), "PNG"), "PNG"


@pytest.mark.parametrize("mode", ["RGBA", "F", "I;16"])
def test_decoding_a_wide_image_costs_about_its_decoded_bytes(mode: str, tmp_path) -> None:
    import subprocess
    import sys

    from service.config import PROJECT_ROOT

    side = 4000
    data, _ = hostile(mode, side)
    path = tmp_path / "wide.img"
    path.write_bytes(data)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, check=True)
    grown = int(out.stdout.split()[-1])
    decoded = side * side * (2 if mode == "I;16" else 4)
    # Before: copies for orientation, alpha compositing and float scaling cost 4-8x.
    assert grown < 1.25 * decoded + 8 * 1024**2, (grown, decoded)


def test_decoded_bytes_beyond_the_limit_are_refused_before_decoding() -> None:
    from service.images.decode import decode

    data, _ = hostile("RGBA", 1000)
    assert decode(data, max_pixels=10**7).image.size == (1000, 1000)
    with pytest.raises(ImageDecodeError) as err:
        decode(data, max_pixels=10**7, max_decoded_bytes=3_000_000)
    assert err.value.code == "image_too_large" and "4000000 bytes" in err.value.message
    # 16-bit grey needs half of what RGBA does.
    grey, _ = hostile("I;16", 1000)
    assert decode(grey, max_pixels=10**7, max_decoded_bytes=3_000_000).width == 1000


def test_decodes_in_one_process_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from PIL import ImageFile

    from service.config import DEFAULTS

    data = encode(Image.new("RGB", (300, 300), (1, 2, 3)), "PNG")
    running, most = 0, 0
    lock = threading.Lock()
    load = ImageFile.ImageFile.load

    def counted(self: ImageFile.ImageFile) -> object:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        try:
            return load(self)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        preprocess(data, PREP, max_pixels=10**6)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= most <= DEFAULTS["MAX_CONCURRENT_DECODES"]


def lying_jpeg(side: int = 8000, **save: object) -> bytes:
    """A 16x16 JPEG whose frame header claims side x side pixels."""
    import struct

    data = bytearray(encode(Image.new("RGB", (16, 16), (200, 100, 50)), "JPEG", **save))
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


@pytest.mark.parametrize("draft", [None, 256])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_claiming_more_pixels_than_it_holds_is_refused(draft: int | None,
                                                             progressive: bool) -> None:
    data = lying_jpeg(progressive=progressive)
    assert len(data) < 1000 and Image.open(io.BytesIO(data)).size == (8000, 8000)
    with pytest.raises(ImageDecodeError) as err:
        open_image(data, max_pixels=64_000_000, draft_size=draft)
    assert err.value.code == "truncated_image"


@pytest.mark.parametrize("save", [{"optimize": True}, {"progressive": True, "optimize": True}])
def test_large_plain_jpeg_decodes_in_draft_and_reports_its_real_size(save: dict) -> None:
    from service.images.decode import decode

    # A uniform grey image is the least scan data a real JPEG of this size can have.
    data = encode(Image.new("L", (8000, 6000), 255), "JPEG", **save)
    decoded = decode(data, max_pixels=64_000_000, draft_size=256)
    assert (decoded.format, decoded.width, decoded.height) == ("JPEG", 8000, 6000)
    assert 256 <= min(decoded.image.size) < 512


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", [6, 8])
def test_reported_size_is_after_exif_orientation(fmt: str, orientation: int) -> None:
    from service.images.decode import decode, image_header

    exif = Image.Exif()
    exif[0x0112] = orientation
    img = Image.new("RGB", (600, 300), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 300, 300))
    data = encode(img, fmt, exif=exif if fmt == "TIFF" else exif.tobytes())
    assert image_header(data) == (fmt, 300, 600)
    for draft in (None, 100):
        decoded = decode(data, max_pixels=10**6, draft_size=draft)
        assert (decoded.width, decoded.height) == (300, 600)
        pixels = to_rgb(decoded.image)
        w, h = pixels.size
        assert h == 2 * w  # the pixels turned once, not twice
        # ROTATE_270 (6) puts the red left half on top; ROTATE_90 (8) at the bottom.
        red_row = h // 4 if orientation == 6 else 3 * h // 4
        assert tuple(np.asarray(pixels)[red_row, w // 2])[0] > 200


def test_multipage_tiff_decodes_its_first_page_only() -> None:
    pages = [Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (4000, 4000))]
    out = io.BytesIO()
    pages[0].save(out, "TIFF", save_all=True, append_images=pages[1:])
    img = to_rgb(open_image(out.getvalue(), max_pixels=1000))
    assert img.size == (20, 20) and np.asarray(img)[10, 10][0] == 255


@pytest.mark.parametrize("size", [(1, 65535), (65535, 1), (3, 40000)])
def test_a_thin_strip_is_resized_within_bounded_memory(size: tuple[int, int]) -> None:
    """A few hundred bytes of PNG must not become gigabytes once its short side is resized."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from PIL import Image\n"
        "from service.embedding.transforms import resize_and_crop\n"
        f"out = resize_and_crop(Image.new('RGB', {size!r}), resize=256, size=224)\n"
        "assert out.size == (224, 224), out.size\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_ordinary_aspect_ratios_resize_as_before() -> None:
    """Up to MAX_ASPECT the strip cut does not apply: the result is the plain resize and crop."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (300, 1200, 3), dtype=np.uint8))
    plain = img.resize((1024, 256), Image.Resampling.BILINEAR, reducing_gap=None)
    expected = plain.crop((400, 16, 624, 240))
    assert np.array_equal(np.asarray(resize_and_crop(img, resize=256, size=224)),
                          np.asarray(expected))
