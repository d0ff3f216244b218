"""Read PyTorch checkpoints (legacy and zip formats) into numpy arrays, without torch.

A `.pth` file is a pickle, and unpickling runs whatever callables the file names. We
never use `pickle.load` on it as is: `unpickle.RestrictedUnpickler.find_class` hands out only
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

import io
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from service.embedding.convert.unpickle import CheckpointError, TensorRef, unpickle

__all__ = ["CheckpointError", "load_checkpoint"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _widen_bfloat16(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _materialise(ref: TensorRef, storage: np.ndarray) -> np.ndarray:
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
        if not isinstance(value, TensorRef):
            raise CheckpointError(f"state dict entry {name!r} is not a tensor")
        result[name] = _materialise(value, storages[value.storage.key])
    return result


def _load_legacy(data: bytes) -> dict[str, np.ndarray]:
    # BytesIO over bytes shares the buffer, so this costs no copy of the file.
    buf = io.BytesIO(data)
    magic, _ = unpickle(buf, allow_tensors=False)
    if magic != LEGACY_MAGIC:
        raise CheckpointError("not a PyTorch checkpoint (bad magic number)")
    protocol, _ = unpickle(buf, allow_tensors=False)
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"unsupported legacy checkpoint protocol {protocol!r:.40}")
    sys_info, _ = unpickle(buf, allow_tensors=False)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointError("only little-endian legacy checkpoints are supported")

    obj, refs = unpickle(buf, allow_tensors=True, legacy=True)
    keys, _ = unpickle(buf, allow_tensors=False)
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
            obj, refs = unpickle(io.BytesIO(archive.read(pickles[0])), allow_tensors=True)
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
