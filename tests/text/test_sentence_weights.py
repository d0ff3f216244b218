"""Reading the sentence model's safetensors weights: only exactly MiniLM's tensors get through."""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from service.embedding.convert.minilm import Expected, build_minilm, expected_tensors, read_weights
from service.embedding.convert.weights import WeightsError
from service.embedding.registry import ModelError
from service.text import sentence

TINY = {"a": Expected("F32", (2, 3)), "b": Expected("I64", (4,)),
        "extra": Expected("F32", (1,), used=False)}


def tiny(tmp_path: Path, **tensors: np.ndarray) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def good() -> dict[str, np.ndarray]:
    return {"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.int64)}


@functools.cache
def real() -> dict[str, np.ndarray]:
    return sentence.read_safetensors(sentence.package_dir() / "model.safetensors")


def test_the_packaged_file_is_exactly_what_is_expected() -> None:
    weights = real()
    spec = expected_tensors()
    assert set(weights) == set(spec) and len(weights) == 104
    for name, array in weights.items():
        assert array.shape == spec[name].shape
        assert array.dtype == {"F32": np.float32, "I64": np.int64}[spec[name].dtype]


def test_expected_tensors_are_read_and_unused_ones_may_be_absent(tmp_path: Path) -> None:
    out = read_weights(tiny(tmp_path, **good()), TINY)
    assert set(out) == {"a", "b"}
    np.testing.assert_array_equal(out["b"], np.arange(4))


@pytest.mark.parametrize(("change", "message"), [
    ({"c": np.zeros(1, np.float32)}, "unexpected tensors c"),
    ({"a": np.ones((3, 2), np.float32)}, r"tensor a is F32 \[3, 2\], all-MiniLM-L6-v2 has F32"),
    ({"a": np.ones((2, 3), np.float64)}, "tensor a is F64"),
    ({"b": np.arange(4, dtype=np.int32)}, "tensor b is I32"),
    ({"extra": np.zeros(2, np.float32)}, r"tensor extra is F32 \[2\]"),
])
def test_unexpected_names_dtypes_and_shapes_are_refused(
        tmp_path: Path, change: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(WeightsError, match=message):
        read_weights(tiny(tmp_path, **{**good(), **change}), TINY)


def test_a_missing_tensor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no tensor b"):
        read_weights(tiny(tmp_path, a=np.ones((2, 3), np.float32)), TINY)


@pytest.mark.parametrize("corrupt", ["not safetensors", "huge header", "truncated", "absent"])
def test_unreadable_files_are_refused(tmp_path: Path, corrupt: str) -> None:
    path = tiny(tmp_path, **good())
    data = path.read_bytes()
    if corrupt == "not safetensors":
        path.write_bytes(b"PK\x03\x04" + bytes(100))
    elif corrupt == "huge header":
        path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif corrupt == "truncated":
        path.write_bytes(data[:-5])
    else:
        path.unlink()
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_weights(path, TINY)


def test_the_sentence_model_refuses_a_foreign_file_with_model_error(tmp_path: Path) -> None:
    # ModelError is what `lookalike models install` turns into a one-line message.
    path = tiny(tmp_path, **{"encoder.layer.6.output.dense.weight": np.zeros(1, np.float32)})
    with pytest.raises(ModelError, match="unexpected tensors encoder.layer.6"):
        sentence.read_safetensors(path)


def test_a_misshapen_tensor_in_the_real_file_is_refused(tmp_path: Path) -> None:
    weights = dict(real())
    weights["embeddings.word_embeddings.weight"] = weights[
        "embeddings.word_embeddings.weight"][:30000]
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    with pytest.raises(ModelError, match=r"word_embeddings.weight is F32 \[30000, 384\]"):
        sentence.read_safetensors(path)


def test_install_leaves_nothing_behind_when_the_weights_are_wrong(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "package"
    source.mkdir()
    save_file({"pooler.dense.bias": np.zeros(384, np.float32)}, str(source / "model.safetensors"))
    monkeypatch.setattr(sentence, "package_dir", lambda: source)
    models = tmp_path / "models"
    with pytest.raises(ModelError, match="no tensor"):
        sentence.install_sentence_model(models)
    assert not sentence.is_installed(models)
    assert not (models / "text").exists() or not any((models / "text").iterdir())


def test_the_graph_builder_names_a_misshapen_tensor() -> None:
    weights = dict(real())
    weights["encoder.layer.5.output.LayerNorm.bias"] = np.zeros(383, np.float32)
    with pytest.raises(WeightsError, match=r"encoder.layer.5.output.LayerNorm.bias.*\(384,\)"):
        build_minilm(weights)
    del weights["encoder.layer.5.output.LayerNorm.bias"]
    with pytest.raises(WeightsError, match="no tensor 'encoder.layer.5.output.LayerNorm.bias'"):
        build_minilm(weights)


def test_models_verify_knows_the_sentence_model(sentence_model: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from service.cli import main

    monkeypatch.setenv("LOOKALIKE_MODEL_DIR", str(sentence_model))
    done = CliRunner().invoke(main, ["models", "verify", "all-minilm-l6-v2"])
    assert done.exit_code == 0, done.output
    assert "inference ok, dim=384" in done.output
    monkeypatch.setenv("LOOKALIKE_MODEL_DIR", str(tmp_path))
    missing = CliRunner().invoke(main, ["models", "verify", "all-minilm-l6-v2"])
    assert missing.exit_code == 1 and "not installed" in missing.output
