"""A JPEG check libjpeg does not make: is there scan data enough for the frame it claims?

libjpeg treats scan data that ends early (at the EOI marker, or at any marker) as a warning:
it fills the missing blocks with grey and reports success, and Pillow then reports the
frame's size. A 600-byte file claiming 8000x8000 pixels would be "decoded" that way.
"""

from __future__ import annotations

import math

# Frames coded with Huffman tables: baseline, extended, progressive, lossless.
HUFFMAN_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3})
# Arithmetic-coded frames (no browser decodes them) and hierarchical ones (libjpeg refuses).
OTHER_FRAMES = frozenset({0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0-7 carry no length
SOS, EOI = 0xDA, 0xD9


class JpegStructureError(ValueError):
    """The JPEG's structure contradicts its header; `code` names the reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _entropy_end(data: bytes, pos: int) -> int:
    """Where the entropy-coded segment starting at `pos` ends (at the next real marker)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        nxt = data[pos + 1]
        # FF00 is a stuffed byte, FFD0-FFD7 restart markers, FFFF fill: all inside the scan.
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
            pos += 1 if nxt == 0xFF else 2
            continue
        return pos


def scan_summary(data: bytes) -> tuple[int | None, int]:
    """The first frame's SOF marker and the bytes of scan data before the first EOI."""
    frame: int | None = None
    scanned = 0
    pos = 2  # after SOI
    size = len(data)
    while pos + 1 < size:
        if data[pos] != 0xFF:
            break  # not a marker where one must be: libjpeg decides what that means
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == EOI:
            break
        if marker in STANDALONE:
            pos += 2
            continue
        if pos + 4 > size:
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if frame is None and (marker in HUFFMAN_FRAMES or marker in OTHER_FRAMES):
            frame = marker
        pos += 2 + length
        if marker == SOS:
            end = _entropy_end(data, pos)
            scanned += end - pos
            pos = end
    return frame, scanned


def check_scan_covers_frame(data: bytes, width: int, height: int) -> None:
    """Refuse a JPEG whose scan data is too short to code every block of its frame.

    Every Huffman code is at least one bit, and every 8x8 block of the full-resolution
    component codes at least its DC term (progressive files: in the first DC scan), so a
    complete image has at least one bit of scan data per block.
    """
    frame, scanned = scan_summary(data)
    if frame is not None and frame not in HUFFMAN_FRAMES:
        raise JpegStructureError(
            "unsupported_image",
            "arithmetic-coded and hierarchical JPEGs are not supported")
    blocks = math.ceil(width / 8) * math.ceil(height / 8)
    if scanned * 8 < blocks:
        raise JpegStructureError(
            "truncated_image",
            f"the JPEG claims {width}x{height} pixels but holds scan data for far fewer "
            f"({scanned} bytes for {blocks} blocks): it is truncated or corrupt")
