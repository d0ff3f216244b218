"""Property test of the decoding path: mutated image bytes never raise anything unexpected."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.embedding.transforms import Preprocessing, preprocess
from service.images.decode import ImageDecodeError

PREP = Preprocessing(size=32, resize=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _seed(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


SEEDS = [_seed(fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[pos:]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_decode_or_fail_cleanly(data: bytes) -> None:
    try:
        arr = preprocess(data, PREP, max_pixels=1_000_000)
    except ImageDecodeError as exc:
        assert exc.code in {"empty_file", "not_an_image", "corrupt_image", "image_too_large",
                            "invalid_image", "truncated_image", "unsupported_image"}
        return
    assert arr.shape == (3, 32, 32) and np.isfinite(arr).all()
