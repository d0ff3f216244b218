"""The restricted unpickler that reads a PyTorch checkpoint's pickles without running code.

Unpickling runs whatever callables a pickle names. `RestrictedUnpickler.find_class` hands
out only our own stand-ins for the handful of names a plain state dict uses, so a file that
names anything else (`os.system`, `builtins.eval`, ...) fails before anything runs; every
stand-in is sealed against the BUILD opcode, and the opcodes are parsed before unpickling.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import warnings
from dataclasses import dataclass
from typing import IO, Any, TypeGuard

import numpy as np

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
class StorageRef(_Sealed):
    """A storage named by a persistent id; its bytes are read after the pickle."""

    key: str
    type: _StorageType
    numel: int


@dataclass(frozen=True)
class TensorRef(_Sealed):
    """What `_rebuild_tensor_v2` was asked to build: a strided view into a storage."""

    storage: StorageRef
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
) -> TensorRef:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: validate and record the view."""
    if not isinstance(storage, StorageRef):
        raise CheckpointError("tensor does not refer to a storage")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise CheckpointError(f"invalid storage offset {storage_offset!r}")
    if not isinstance(size, tuple) or not isinstance(stride, tuple):
        raise CheckpointError("tensor size and stride must be tuples")
    if len(size) != len(stride) or len(size) > MAX_NDIM:
        raise CheckpointError(f"invalid tensor shape {size!r} / stride {stride!r}")
    if not all(_is_int(n) and n >= 0 for n in size + stride):
        raise CheckpointError(f"invalid tensor shape {size!r} / stride {stride!r}")
    return TensorRef(storage, storage_offset, size, stride)


class _Rebuilder(_Sealed):
    """What the pickle gets for `_rebuild_tensor_v2`: sealed, unlike a plain function
    (whose `__defaults__` a BUILD could otherwise rewrite for every later load)."""

    def __call__(self, *args: object) -> TensorRef:
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


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the names a plain tensor state dict needs."""

    def __init__(self, file: IO[bytes], *, allow_tensors: bool) -> None:
        super().__init__(file)
        self.allow_tensors = allow_tensors
        self.storages: dict[str, StorageRef] = {}

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

    def persistent_load(self, pid: Any) -> StorageRef:
        """Turn a `('storage', type, key, location, numel[, view])` id into a StorageRef."""
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
        ref = StorageRef(key, stype, numel)
        seen = self.storages.setdefault(key, ref)
        if seen != ref:
            raise CheckpointError(f"storage {key!r} is declared twice with different types")
        return seen


class _LegacyUnpickler(RestrictedUnpickler):
    """The legacy format's persistent ids carry a sixth item, view metadata."""

    def persistent_load(self, pid: Any) -> StorageRef:
        """Accept legacy ids; storage views (pre-1.0 files) are not supported."""
        if isinstance(pid, tuple) and len(pid) == 6:
            if pid[5] is not None:
                raise CheckpointError("storage views (pre-1.0 checkpoints) are not supported")
            pid = pid[:5]
        return super().persistent_load(pid)


def unpickle(
    buf: io.BytesIO, *, allow_tensors: bool, legacy: bool = False
) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle the pickle at `buf`'s position, leaving it just past; also its storages."""
    _check_opcodes(buf)
    cls = _LegacyUnpickler if legacy else RestrictedUnpickler
    unpickler = cls(buf, allow_tensors=allow_tensors)
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except Exception as exc:
        # UnpicklingError, TypeError from a REDUCE on a non-callable, MemoryError, ...
        raise CheckpointError(f"corrupt checkpoint pickle: {type(exc).__name__}: {exc}") from exc
    return obj, unpickler.storages
