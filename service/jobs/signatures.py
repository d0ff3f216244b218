"""Whether a file's first bytes can begin an image the decoder accepts, without decoding it.

The check asks the very plugins `Image.open(..., formats=ALLOWED_FORMATS)` would ask, with the
same 16-byte prefix, so it refuses nothing the decoder would open (HEIF's `ftyp` brands, both
TIFF byte orders and BigTIFF included) and follows ALLOWED_FORMATS when it changes.
"""

from __future__ import annotations

import struct

from PIL import Image

from service.images.decode import ALLOWED_FORMATS

# What Image.open reads before choosing a plugin.
PREFIX_BYTES = 16
EMPTY = "the file is empty"
NOT_AN_IMAGE = ("the file is not an image in a supported format "
                f"({', '.join(ALLOWED_FORMATS)}): its first bytes match none of them")


def could_be_image(head: bytes) -> bool:
    """Whether an allowed format's plugin accepts these first bytes, as Image.open asks it."""
    prefix = head[:PREFIX_BYTES]
    for name in ALLOWED_FORMATS:
        if name.upper() not in Image.OPEN:
            Image.init()
        plugin = Image.OPEN.get(name.upper())
        if plugin is None:
            continue
        accept = plugin[1]
        try:
            result = True if accept is None else accept(prefix)
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
        # A string is Pillow's "not this format, because…" warning, not an acceptance.
        if result and not isinstance(result, str):
            return True
    return False


def image_problem(head: bytes) -> str | None:
    """Why a file starting with `head` cannot be an image, or None when it may be one."""
    if not head:
        return EMPTY
    return None if could_be_image(head) else NOT_AN_IMAGE
