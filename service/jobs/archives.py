"""Safe extraction of uploaded archives (zip, tar, tar.gz/bz2/xz) into a job folder.

Every regular entry is copied to a name we generate (`files/00000001`), so no entry name is
ever used as a path: traversal (`../x`), absolute names and links cannot write anywhere else.
Such entries become failed items with a reason, as do entries that cannot be images (empty,
or starting like no allowed format): they are never written and cost no worker time. Zip
bombs, non-archives and truncated or damaged archives are refused whole.

Over 300 lines: zip and tar readers kept side by side, so that every format passes the
same entry checks (names, links, sizes, ratio) in one place.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from service.errors import ApiError
from service.jobs.metadata import METADATA_NAMES, normalise_key
from service.jobs.signatures import image_problem
from service.jobs.tarstream import BLOCK, Tail, decompressed

COPY_CHUNK = 1024 * 1024
# Per-entry ratio checks only apply above this size: tiny text files compress absurdly well.
RATIO_MIN_BYTES = 1024 * 1024
METADATA_MAX_BYTES = 256 * 1024 * 1024
IGNORED_PARTS = ("__MACOSX",)
IGNORED_NAMES = (".DS_Store", "Thumbs.db")
@dataclass(frozen=True)
class ArchiveLimits:
    """Caps that make a hostile archive cheap to refuse."""

    max_entries: int
    max_total_bytes: int
    max_ratio: float
    max_entry_bytes: int


@dataclass
class Entry:
    """One file of the archive: where its bytes went, or why it was skipped."""

    name: str
    path: Path | None = None
    error: str | None = None
    # Of entries refused as images whose name asked for it: to recognise a metadata file.
    size: int | None = None
    sha256: str | None = None


@dataclass
class Extracted:
    """The archive's files in archive order, and its metadata file if it had one."""

    entries: list[Entry] = field(default_factory=list)
    metadata: bytes | None = None
    metadata_name: str | None = None
    metadata_dir: str = ""


def entry_problem(name: str) -> str | None:
    """Why an entry name must not be extracted, or None when it is a plain relative path."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        return "absolute paths are not allowed in archives"
    if ".." in unified.split("/"):
        return "path traversal ('..') is not allowed in archives"
    if "\x00" in unified:
        return "the entry name contains a NUL character"
    return None


def display_name(name: str) -> str:
    """The entry name as items show it: printable, forward slashes, at most 1024 characters."""
    clean = "".join(c if ord(c) >= 32 and c != "\x7f" else "?" for c in name.replace("\\", "/"))
    return clean[:1024] or "?"


def _ignored(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return any(p in IGNORED_PARTS for p in parts) or parts[-1] in IGNORED_NAMES or (
        parts[-1].startswith("._"))


def _metadata_candidate(name: str) -> bool:
    """A metadata file at the top, or inside the one folder an archive usually wraps files in."""
    parts = normalise_key(name).split("/")
    return parts[-1] in METADATA_NAMES and len(parts) <= 2


def kind_of(path: Path) -> str:
    """'zip' or 'tar'; 400 `not_an_archive` when the file is neither, `corrupt_archive` when
    it is a zip whose end (the central directory) is missing."""
    if zipfile.is_zipfile(path):
        return "zip"
    with path.open("rb") as raw:
        if raw.read(4) == b"PK\x03\x04":
            raise ApiError("corrupt_archive", "the zip archive is truncated or damaged: its "
                           "central directory is missing")
        raw.seek(0)
        stream = decompressed(raw)
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|") as tf:
                tf.next()
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            if stream.inner is not raw:  # gzip, bzip2 or xz, cut short or damaged
                raise ApiError("corrupt_archive", "the compressed archive is truncated or "
                               f"damaged: {exc}") from exc
            raise _not_an_archive() from exc
        except tarfile.TarError as exc:
            raise _not_an_archive() from exc
    return "tar"


def _not_an_archive() -> ApiError:
    return ApiError("not_an_archive", "the upload is not a .zip, .tar or compressed .tar archive")


class _Writer:
    """Copies entry streams into the job folder, enforcing the totals as bytes arrive."""

    def __init__(self, dest: Path, limits: ArchiveLimits, archive_bytes: int) -> None:
        self.files = dest / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.archive_bytes = max(archive_bytes, 1)
        self.total = 0
        self.count = 0

    def count_entry(self) -> None:
        self.count += 1
        if self.count > self.limits.max_entries:
            raise ApiError("archive_too_large",
                           f"the archive has more than {self.limits.max_entries} entries")

    def reserve(self, size: int) -> None:
        """Account for an entry's declared size before reading it."""
        self.total += size
        if self.total > self.limits.max_total_bytes:
            raise ApiError("archive_too_large", "the archive expands to more than "
                           f"{self.limits.max_total_bytes} bytes")
        if (self.total > RATIO_MIN_BYTES
                and self.total > self.limits.max_ratio * self.archive_bytes):
            raise ApiError("zip_bomb", "the archive expands more than "
                           f"{self.limits.max_ratio:g} times its size")

    def copy(self, stream: IO[bytes], declared: int,
             fingerprint: bool = False) -> tuple[Path | None, str | None, str | None]:
        """Write one entry to a fresh file; never more, nor fewer, bytes than it declared.

        Returns the path, or why the entry cannot be an image (then nothing is written), with
        the sha256 of such an entry when `fingerprint` asks for it.
        """
        head = stream.read(COPY_CHUNK)
        problem = image_problem(head)
        if problem is not None:
            digest = hashlib.sha256(head) if fingerprint else None
            written = len(head)
            while fingerprint and (chunk := stream.read(COPY_CHUNK)):
                written += len(chunk)
                if written > declared:
                    raise ApiError("zip_bomb", "an archive entry is larger than it declares")
                digest.update(chunk)  # type: ignore[union-attr]
            return None, problem, digest.hexdigest() if digest is not None else None
        target = self.files / f"{self.count:08d}"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        written = 0
        with os.fdopen(fd, "wb") as out:
            chunk = head
            while chunk:
                written += len(chunk)
                if written > declared:
                    raise ApiError("zip_bomb", "an archive entry is larger than it declares")
                out.write(chunk)
                chunk = stream.read(COPY_CHUNK)
        if written < declared:
            raise ApiError("corrupt_archive", "the archive is truncated: an entry ends after "
                           f"{written} of its {declared} bytes")
        return target, None, None


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits,
                    fingerprint: Callable[[str], bool] | None = None) -> Extracted:
    """Extract `archive` safely under `dest`; ApiError for non-archives, bombs and damage.

    `fingerprint(name)` says which entries that are not images to hash (a metadata file
    sent beside the archive may be among them).
    """
    kind = kind_of(archive)
    writer = _Writer(dest, limits, archive.stat().st_size)
    wanted = fingerprint or (lambda name: False)
    try:
        if kind == "zip":
            return _extract_zip(archive, writer, wanted)
        return _extract_tar(archive, writer, wanted)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ApiError("corrupt_archive", f"the archive is truncated or damaged: {exc}") from exc
    except OSError as exc:
        if exc.errno is not None:
            raise  # A local I/O problem (disk full), not a bad archive.
        # gzip.BadGzipFile and friends carry no errno.
        raise ApiError("corrupt_archive", f"the archive is truncated or damaged: {exc}") from exc


def _take_metadata(out: Extracted, name: str, stream: IO[bytes], size: int) -> bool:
    """Consume metadata files (the top-level one wins); returns whether this entry was one."""
    if not _metadata_candidate(name):
        return False
    key = normalise_key(name)
    folder = posixpath.dirname(key)
    if out.metadata_name is not None and (out.metadata_dir == "" or folder != ""):
        return True  # Keep the first, preferring the top level; extra ones are not images.
    if size > METADATA_MAX_BYTES:
        raise ApiError("invalid_metadata", f"{name} is larger than {METADATA_MAX_BYTES} bytes")
    out.metadata = stream.read(METADATA_MAX_BYTES + 1)
    out.metadata_name = key
    out.metadata_dir = folder
    return True


def _add(out: Extracted, name: str, copied: tuple[Path | None, str | None, str | None],
         size: int) -> None:
    path, problem, digest = copied
    out.entries.append(Entry(name, path=path, error=problem,
                             size=size if digest is not None else None, sha256=digest))


def _extract_zip(archive: Path, writer: _Writer, fingerprint: Callable[[str], bool]) -> Extracted:
    out = Extracted()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > writer.limits.max_entries:
            raise ApiError("archive_too_large",
                           f"the archive has more than {writer.limits.max_entries} entries")
        # Declared sizes bound what zipfile will inflate, so the totals can be checked up front.
        declared = sum(i.file_size for i in infos if not i.is_dir())
        if declared > writer.limits.max_total_bytes:
            raise ApiError("archive_too_large", "the archive expands to more than "
                           f"{writer.limits.max_total_bytes} bytes")
        if declared > RATIO_MIN_BYTES and declared > writer.limits.max_ratio * writer.archive_bytes:
            raise ApiError("zip_bomb", "the archive expands more than "
                           f"{writer.limits.max_ratio:g} times its size")
        for info in infos:
            if info.is_dir() or _ignored(info.filename):
                continue
            writer.count_entry()
            name = display_name(info.filename)
            mode = info.external_attr >> 16
            problem = entry_problem(info.filename)
            if problem is None and stat.S_ISLNK(mode):
                problem = "links are not allowed in archives"
            elif problem is None and mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                problem = "not a regular file"
            elif problem is None and info.flag_bits & 0x1:
                problem = "encrypted entries are not supported"
            elif problem is None and info.file_size > writer.limits.max_entry_bytes:
                problem = f"larger than the limit of {writer.limits.max_entry_bytes} bytes"
            elif problem is None and info.file_size > RATIO_MIN_BYTES and (
                    info.file_size > writer.limits.max_ratio * max(info.compress_size, 1)):
                problem = (f"compression ratio above {writer.limits.max_ratio:g} "
                           "(a decompression bomb?)")
            if problem is not None:
                out.entries.append(Entry(name, error=problem))
                continue
            with zf.open(info) as stream:
                if _take_metadata(out, info.filename, stream, info.file_size):
                    continue
                writer.reserve(info.file_size)
                _add(out, name, writer.copy(stream, info.file_size, fingerprint(info.filename)),
                     info.file_size)
    return out


def _tar_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        member = tf.next()
        if member is None:
            return
        yield member


def _extract_tar(archive: Path, writer: _Writer, fingerprint: Callable[[str], bool]) -> Extracted:
    out = Extracted()
    with archive.open("rb") as raw, decompressed(raw) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tf:
        # Stream mode: one pass, no seeking back through a compressed stream.
        for member in _tar_members(tf):
            tf.members.clear()  # tarfile keeps every header otherwise: 1M entries, ~1 GB
            if member.isdir() or _ignored(member.name):
                continue
            writer.count_entry()
            # Skipping a member still inflates it in a stream, so every size counts to the caps.
            writer.reserve(max(member.size, 0))
            name = display_name(member.name)
            problem = entry_problem(member.name)
            if problem is None and (member.issym() or member.islnk()):
                problem = "links are not allowed in archives"
            elif problem is None and not member.isfile():
                problem = "not a regular file"
            elif problem is None and member.size > writer.limits.max_entry_bytes:
                problem = f"larger than the limit of {writer.limits.max_entry_bytes} bytes"
            if problem is not None:
                out.entries.append(Entry(name, error=problem))
                continue
            extracted = tf.extractfile(member)
            if extracted is None:
                out.entries.append(Entry(name, error="not a regular file"))
                continue
            with extracted:
                if _take_metadata(out, member.name, extracted, member.size):
                    continue
                _add(out, name, writer.copy(extracted, member.size, fingerprint(member.name)),
                     member.size)
        _check_end(tf, stream, writer)
    return out


def _check_end(tf: tarfile.TarFile, stream: Tail, writer: _Writer) -> None:
    """Refuse a tar that stops without its end marker, or whose compressed stream is cut."""
    # tarfile ends its listing silently at a missing or garbled header: only a zero block,
    # the end-of-archive marker, means the archive really ends here.
    block = stream.block_at(tf.offset)
    if len(block) < BLOCK:
        raise ApiError("corrupt_archive", "the archive is truncated: it ends at byte "
                       f"{stream.position} of its contents, without the end-of-archive marker")
    if block.count(0) != BLOCK:
        raise ApiError("corrupt_archive", f"the archive is damaged: no valid header at byte "
                       f"{tf.offset} of its contents")
    # The decompressor checks its stream's end (and CRC) only when read to the end.
    while chunk := stream.read(COPY_CHUNK):
        writer.reserve(len(chunk))
