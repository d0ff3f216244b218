"""Read PyTorch checkpoints (legacy and zip formats) into numpy arrays, without torch.

A `.pth` file is a pickle, and unpickling runs whatever callables the file names. We
never use `pickle.load` on it as is: `_RestrictedUnpickler.find_class` hands out only
our own stand-ins for the handful of names a plain state dict uses, so a file that
names anything else (`os.system`, `builtins.eval`, ...) fails before anything runs.

Legacy (non-zip) layout, as written by `torch.save(..., _use_new_zipfile_serialization=False)`
and by every torch before 1.6:

    pickle: magic number   pickle: protocol version   pickle: sys info
    pickle: the object (tensors are persistent ids naming storages)
    pickle: list of storage keys, in the order the storages follow
    per storage: int64 little-endian element count, then the raw little-endian bytes

Zip layout (torch >= 1.6): `<prefix>/data.pkl` is the object pickle and each storage is
the uncompressed entry `<prefix>/data/<key>`; `<prefix>/byteorder` may say "big".
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard

import numpy as np

__all__ = ["CheckpointError", "load_checkpoint"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# No real state dict comes close; it bounds what a hostile file can make us build.
MAX_NDIM = 32


class CheckpointError(Exception):
    """The file is not a checkpoint we can read safely; the message says why."""


class _Sealed:
    """Base of every object a checkpoint pickle can get hold of.

    The pickle BUILD opcode calls `__setstate__` on whatever is on the stack, or else
    writes straight into its `__dict__` (frozen dataclasses included). Without this, a
    hostile file could rewrite a storage type's dtype, or a validated tensor's shape and
    strides, after we checked them.
    """

    def __setstate__(self, state: object) -> None:
        raise CheckpointError("checkpoint pickle tries to modify a tensor or storage object")


@dataclass(frozen=True)
class _StorageType(_Sealed):
    """A `torch.<Name>Storage` class as named in the pickle: how its bytes decode."""

    name: str
    dtype: np.dtype[Any]
    bfloat16: bool = False


def _storage_types() -> dict[str, _StorageType]:
    table: dict[str, tuple[str, bool]] = {
        "DoubleStorage": ("<f8", False),
        "FloatStorage": ("<f4", False),
        "HalfStorage": ("<f2", False),
        # numpy has no bfloat16: read the raw 16 bits and widen to float32 afterwards.
        "BFloat16Storage": ("<u2", True),
        "LongStorage": ("<i8", False),
        "IntStorage": ("<i4", False),
        "ShortStorage": ("<i2", False),
        "CharStorage": ("i1", False),
        "ByteStorage": ("u1", False),
        "BoolStorage": ("?", False),
        "ComplexFloatStorage": ("<c8", False),
        "ComplexDoubleStorage": ("<c16", False),
    }
    return {name: _StorageType(name, np.dtype(code), bf16) for name, (code, bf16) in table.items()}


_STORAGE_TYPES = _storage_types()


@dataclass(frozen=True)
class _StorageRef(_Sealed):
    """A storage named by a persistent id; its bytes are read after the pickle."""

    key: str
    type: _StorageType
    numel: int


@dataclass(frozen=True)
class _TensorRef(_Sealed):
    """What `_rebuild_tensor_v2` was asked to build: a strided view into a storage."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int  # bool is an int subclass but never a valid size


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> _TensorRef:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: validate and record the view."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("tensor does not refer to a storage")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise CheckpointError(f"invalid storage offset {storage_offset!r}")
    if not isinstance(size, tuple) or not isinstance(stride, tuple):
        raise CheckpointError("tensor size and stride must be tuples")
    if len(size) != len(stride) or len(size) > MAX_NDIM:
        raise CheckpointError(f"invalid tensor shape {size!r} / stride {stride!r}")
    if not all(_is_int(n) and n >= 0 for n in size + stride):
        raise CheckpointError(f"invalid tensor shape {size!r} / stride {stride!r}")
    return _TensorRef(storage, storage_offset, size, stride)


class _Rebuilder(_Sealed):
    """What the pickle gets for `_rebuild_tensor_v2`: sealed, unlike a plain function
    (whose `__defaults__` a BUILD could otherwise rewrite for every later load)."""

    def __call__(self, *args: object) -> _TensorRef:
        return _rebuild_tensor_v2(*args)


def _check_opcodes(buf: io.BytesIO) -> None:
    """Parse one pickle's opcodes without running any; reject absurd memo indices.

    CPython's unpickler grows its memo array up to the largest PUT index, so a 4-byte
    index near 2**32 would make it allocate tens of GiB before failing. A real pickle
    never has more memo entries than it has bytes. Parsing first also turns a truncated
    pickle into a clean error before the unpickler sees it.
    """
    start = buf.tell()
    limit = buf.seek(0, io.SEEK_END) - start  # not getbuffer(): that would copy the bytes
    buf.seek(start)
    try:
        with warnings.catch_warnings():
            # pickletools warns on bad escapes in protocol-0 strings; torch never writes
            # those, so treat them as corruption rather than letting the warning out.
            warnings.simplefilter("error")
            for opcode, arg, _pos in pickletools.genops(buf):
                if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and (
                    not isinstance(arg, int) or arg > limit
                ):
                    raise CheckpointError(f"pickle memo index {arg!r:.40} is out of range")
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"corrupt or truncated pickle: {exc}") from exc
    finally:
        buf.seek(start)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the names a plain tensor state dict needs."""

    def __init__(self, file: IO[bytes], *, allow_tensors: bool) -> None:
        super().__init__(file)
        self.allow_tensors = allow_tensors
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Return our stand-in for an allowed global; refuse everything else."""
        if self.allow_tensors:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _Rebuilder()
            if module == "torch" and name in _STORAGE_TYPES:
                return _STORAGE_TYPES[name]
        raise CheckpointError(
            f"checkpoint refers to {module:.100}.{name:.100}, which a plain tensor state dict "
            "never does; refusing to load it"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        """Turn a `('storage', type, key, location, numel[, view])` id into a _StorageRef."""
        if not self.allow_tensors:
            raise CheckpointError("unexpected persistent id in checkpoint header")
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise CheckpointError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, location, numel = pid[:5]
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"unsupported storage type {stype!r:.80}")
        if not isinstance(key, str) or not isinstance(location, str):
            raise CheckpointError(f"invalid storage key {key!r:.80}")
        if not _is_int(numel) or numel < 0:
            raise CheckpointError(f"invalid storage size {numel!r:.80}")
        ref = _StorageRef(key, stype, numel)
        seen = self.storages.setdefault(key, ref)
        if seen != ref:
            raise CheckpointError(f"storage {key!r} is declared twice with different types")
        return seen


class _LegacyUnpickler(_RestrictedUnpickler):
    """The legacy format's persistent ids carry a sixth item, view metadata."""

    def persistent_load(self, pid: Any) -> _StorageRef:
        """Accept legacy ids; storage views (pre-1.0 files) are not supported."""
        if isinstance(pid, tuple) and len(pid) == 6:
            if pid[5] is not None:
                raise CheckpointError("storage views (pre-1.0 checkpoints) are not supported")
            pid = pid[:5]
        return super().persistent_load(pid)


def _unpickle(
    buf: io.BytesIO, *, allow_tensors: bool, legacy: bool = False
) -> tuple[Any, dict[str, _StorageRef]]:
    """Unpickle the pickle at `buf`'s position, leaving it just past; also its storages."""
    _check_opcodes(buf)
    cls = _LegacyUnpickler if legacy else _RestrictedUnpickler
    unpickler = cls(buf, allow_tensors=allow_tensors)
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except Exception as exc:
        # UnpicklingError, TypeError from a REDUCE on a non-callable, MemoryError, ...
        raise CheckpointError(f"corrupt checkpoint pickle: {type(exc).__name__}: {exc}") from exc
    return obj, unpickler.storages


def _widen_bfloat16(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _materialise(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    """Copy a strided view of a storage out into a fresh C-contiguous array."""
    if ref.storage.type.bfloat16:
        storage = _widen_bfloat16(storage)
    count = math.prod(ref.size)
    if count == 0:
        return np.zeros(ref.size, dtype=storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= storage.size:
        raise CheckpointError(
            f"tensor of shape {ref.size} at offset {ref.offset} overruns its storage "
            f"{ref.storage.key!r} of {storage.size} elements"
        )
    if count > storage.size:
        # Only broadcast (stride-0) views can have more elements than their storage, and
        # state dicts never hold them; refusing bounds what a hostile file can allocate.
        raise CheckpointError(f"tensor of shape {ref.size} has more elements than its storage")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.size,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, copy=True, order="C")


def _collect(obj: Any, storages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn the unpickled mapping of names to tensor refs into numpy arrays."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    result: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"state dict key {name!r:.80} is not a string")
        if not isinstance(value, _TensorRef):
            raise CheckpointError(f"state dict entry {name!r} is not a tensor")
        result[name] = _materialise(value, storages[value.storage.key])
    return result


def _load_legacy(data: bytes) -> dict[str, np.ndarray]:
    # BytesIO over bytes shares the buffer, so this costs no copy of the file.
    buf = io.BytesIO(data)
    magic, _ = _unpickle(buf, allow_tensors=False)
    if magic != LEGACY_MAGIC:
        raise CheckpointError("not a PyTorch checkpoint (bad magic number)")
    protocol, _ = _unpickle(buf, allow_tensors=False)
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"unsupported legacy checkpoint protocol {protocol!r:.40}")
    sys_info, _ = _unpickle(buf, allow_tensors=False)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointError("only little-endian legacy checkpoints are supported")

    obj, refs = _unpickle(buf, allow_tensors=True, legacy=True)
    keys, _ = _unpickle(buf, allow_tensors=False)
    pos = buf.tell()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError("corrupt checkpoint: storage key list is not a list of strings")
    if set(keys) != set(refs) or len(keys) != len(refs):
        raise CheckpointError("corrupt checkpoint: storage key list does not match the tensors")

    storages: dict[str, np.ndarray] = {}
    for key in keys:
        ref = refs[key]
        if pos + 8 > len(data):
            raise CheckpointError(f"truncated checkpoint: storage {key!r} is missing")
        (count,) = struct.unpack_from("<q", data, pos)
        pos += 8
        if count != ref.numel:
            raise CheckpointError(
                f"corrupt checkpoint: storage {key!r} has {count} elements, "
                f"the tensor data says {ref.numel}"
            )
        nbytes = count * ref.type.dtype.itemsize
        # Check against what is left of the file before allocating anything.
        if nbytes > len(data) - pos:
            raise CheckpointError(
                f"truncated checkpoint: storage {key!r} needs {nbytes} bytes, "
                f"{len(data) - pos} remain"
            )
        storages[key] = np.frombuffer(data, dtype=ref.type.dtype, count=count, offset=pos)
        pos += nbytes
    return _collect(obj, storages)


def _load_zip(data: bytes) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt zip checkpoint: {exc}") from exc
    with archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError("not a PyTorch checkpoint: no single <name>/data.pkl in the zip")
        prefix = pickles[0].rsplit("/", 1)[0]
        try:
            infos = {info.filename: info for info in archive.infolist()}
            if any(info.compress_type != zipfile.ZIP_STORED for info in infos.values()):
                # torch stores every member uncompressed; insisting on it bounds every size
                # below by the file's own, so no zip bomb gets through.
                raise CheckpointError("zip checkpoint has compressed members; torch never does")
            big_endian = False
            if f"{prefix}/byteorder" in infos:
                order = archive.read(f"{prefix}/byteorder").strip()
                if order not in (b"little", b"big"):
                    raise CheckpointError(f"unknown byte order {order!r:.40}")
                big_endian = order == b"big"
            obj, refs = _unpickle(io.BytesIO(archive.read(pickles[0])), allow_tensors=True)
            storages: dict[str, np.ndarray] = {}
            for key, ref in refs.items():
                name = f"{prefix}/data/{key}"
                info = infos.get(name)
                if info is None:
                    raise CheckpointError(f"storage {key!r} is missing from the zip")
                nbytes = ref.numel * ref.type.dtype.itemsize
                if info.file_size < nbytes:
                    raise CheckpointError(
                        f"storage {key!r} has {info.file_size} bytes, the tensors need {nbytes}"
                    )
                raw = archive.read(name)
                dtype = ref.type.dtype.newbyteorder(">") if big_endian else ref.type.dtype
                array = np.frombuffer(raw, dtype=dtype, count=ref.numel)
                storages[key] = array.astype(ref.type.dtype) if big_endian else array
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            # CRC mismatches and truncated members land here.
            raise CheckpointError(f"corrupt zip checkpoint: {exc}") from exc
    return _collect(obj, storages)


def load_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state-dict checkpoint into name -> numpy array, running no code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        if data[:4] == b"PK\x03\x04":
            return _load_zip(data)
        # Every legacy file starts with the protocol-2 pickle of the magic number.
        if data[:2] != b"\x80\x02":
            raise CheckpointError(f"{path.name} is not a PyTorch checkpoint")
        return _load_legacy(data)
    except CheckpointError:
        raise
    except Exception as exc:
        # The file is untrusted input: whatever else a malformed one trips over (an
        # encrypted zip member, an odd struct) is still "not a checkpoint we can read".
        raise CheckpointError(
            f"unreadable checkpoint {path.name}: {type(exc).__name__}: {exc}"
        ) from exc
