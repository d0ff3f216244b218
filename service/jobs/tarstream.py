"""Reading a (compressed) tar as one stream that notices where, and whether, it really ends."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from collections.abc import Callable
from typing import IO

BLOCK = tarfile.BLOCKSIZE
# Decompressors that notice a stream cut short (tarfile's own stream reader does not).
COMPRESSORS: tuple[tuple[bytes, Callable[[IO[bytes]], IO[bytes]]], ...] = (
    (b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    (b"BZh", lambda raw: bz2.BZ2File(raw, mode="rb")),
    (b"\xfd7zXZ\x00", lambda raw: lzma.LZMAFile(raw, mode="rb")),  # noqa: SIM115
)
# Bytes of decompressed stream kept behind the reader: more than tarfile reads ahead.
TAIL_BYTES = 4 * tarfile.RECORDSIZE


class Tail(io.RawIOBase):
    """A reader that counts what passed through it and keeps the last bytes it returned."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self.inner = inner
        self.position = 0
        self.tail = b""

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self.inner is not None and not self.closed:
            self.inner.close()
        super().close()

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.position += len(data)
        self.tail = (self.tail + data)[-TAIL_BYTES:]
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def block_at(self, offset: int) -> bytes:
        """The (up to) 512 bytes at `offset` of the stream, if they are still in the tail."""
        start = self.position - len(self.tail)
        if offset < start:
            return b""
        return self.tail[offset - start:offset - start + BLOCK]


def decompressed(raw: IO[bytes]) -> Tail:
    """The archive's tar stream, through a decompressor chosen by the first bytes."""
    head = raw.read(8)
    raw.seek(0)
    for magic, opener in COMPRESSORS:
        if head.startswith(magic):
            return Tail(opener(raw))
    return Tail(raw)
