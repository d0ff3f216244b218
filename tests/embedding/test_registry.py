"""Installing models: atomic folders, clear errors, INT8 variant close to FP32."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data as samples

from service.cli import main as cli
from service.embedding import registry
from service.embedding.session import Embedder


def photo(name: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(getattr(samples, name)()).save(out, "PNG")
    return out.getvalue()


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(registry.ModelError, match="unknown model 'resnet-9000'"):
        registry.install("resnet-9000", tmp_path)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(cli, ["models", "install", "resnet-9000"],
                                env={"LOOKALIKE_MODEL_DIR": str(tmp_path)})
    assert result.exit_code != 0 and "unknown model" in result.output


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 100])
def test_corrupt_weights_leave_nothing_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 content: bytes) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    entry = dataclasses.replace(registry.CATALOG["efficientnet-lite0"], name="broken")
    monkeypatch.setitem(registry.CATALOG, "broken", entry)
    monkeypatch.setattr(registry.CatalogEntry, "weights_path", lambda self: bad)
    models = tmp_path / "models"
    with pytest.raises(registry.ModelError, match="could not convert bad.pth"):
        registry.install("broken", models)
    assert not models.exists() or list(models.iterdir()) == []


def test_tampered_onnx_fails_verification(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "efficientnet-lite0"
    copy.mkdir()
    (copy / "model.json").write_bytes((model_dir / "efficientnet-lite0" / "model.json")
                                      .read_bytes())
    (copy / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(registry.ModelError, match="sha256"):
        registry.verify(tmp_path, "efficientnet-lite0")


def test_installed_model_json_describes_the_model(model_dir: Path) -> None:
    info = registry.verify(model_dir, "efficientnet-lite0")
    assert (info.dim, info.input_size, info.resize) == (1280, 224, 256)
    assert info.outputs == ["embedding", "logits"] and info.licence == "Apache-2.0"
    assert info.mean[0] == pytest.approx(127 / 255) and info.std[0] == pytest.approx(128 / 255)


def test_int8_variant_agrees_with_fp32(model_dir: Path, tmp_path: Path) -> None:
    info = registry.install("efficientnet-lite0-int8", tmp_path)
    assert info.version == "1.2"  # 7-bit weights: not the vectors of the 8-bit recipe ("1")
    int8 = Embedder(info, tmp_path / "efficientnet-lite0-int8" / "model.onnx")
    fp32_info = registry.verify(model_dir, "efficientnet-lite0")
    fp32 = Embedder(fp32_info, model_dir / "efficientnet-lite0" / "model.onnx")
    images = [photo(n) for n in ("chelsea", "coffee", "rocket", "astronaut")]
    a = fp32.embed_bytes(images, max_pixels=10**8)
    b = int8.embed_bytes(images, max_pixels=10**8)
    cos = (a.vectors * b.vectors).sum(1) / (
        np.linalg.norm(a.vectors, axis=1) * np.linalg.norm(b.vectors, axis=1))
    assert cos.min() > 0.9, cos
    assert (a.logits.argmax(1) == b.logits.argmax(1)).mean() >= 0.75


def tiny_onnx(path: Path, *, out_rank: int = 2, inputs: int = 1) -> Path:
    """A small generated model: average-pool an NCHW image to a 48-d vector."""
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["N", 3, 224, 224])
           for i in range(inputs)]
    nodes = [helper.make_node("AveragePool", ["x0"], ["p"], kernel_shape=[56, 56],
                              strides=[56, 56])]
    if out_rank == 2:
        nodes.append(helper.make_node("Flatten", ["p"], ["feat"], axis=1))
        out = helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 48])
    else:
        nodes.append(helper.make_node("Identity", ["p"], ["feat"]))
        out = helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 3, 4, 4])
    model = helper.make_model(helper.make_graph(nodes, "tiny", ins, [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def test_add_own_onnx_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    result = CliRunner().invoke(cli, ["models", "add", "mine", "--onnx",
                                      str(tiny_onnx(tmp_path / "m.onnx")), "--size", "224"],
                                env={"LOOKALIKE_MODEL_DIR": str(models)})
    assert result.exit_code == 0, result.output
    info = registry.verify(models, "mine")
    assert info.dim == 48 and info.outputs == ["feat"] and info.resize == 256
    vectors = Embedder(info, models / "mine" / "model.onnx").embed_bytes(
        [photo("coffee")], max_pixels=10**8).vectors
    assert vectors.shape == (1, 48)


@pytest.mark.parametrize("kind,message", [("rank4", "2-D"), ("two_inputs", "one input"),
                                          ("garbage", "not a valid ONNX")])
def test_add_refuses_what_is_not_an_image_model(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "m.onnx"
    if kind == "garbage":
        path.write_bytes(b"\x08\x07garbage")
    else:
        tiny_onnx(path, out_rank=4 if kind == "rank4" else 2,
                  inputs=2 if kind == "two_inputs" else 1)
    models = tmp_path / "models"
    with pytest.raises(registry.ModelError, match=message):
        registry.add_onnx("mine", path, models, size=224, resize=None, mean=(0.5,) * 3,
                          std=(0.5,) * 3)
    assert not (models / "mine").exists()


def test_every_catalogue_model_has_its_weights_installed() -> None:
    # `make install` must bring every package the catalogue names, or `models install` fails.
    for entry in registry.CATALOG.values():
        assert entry.weights_path().is_file(), entry.name
