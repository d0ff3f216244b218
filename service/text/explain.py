"""Explain a match: where in the result image the query's features are, and shared classes.

The model's pooled embedding is the mean of a spatial feature map (7 x 7 cells of 1280
channels for EfficientNet-Lite0 at 224 px). The explain graph is the installed model.onnx
with that map added as an output (found by walking back from the embedding output to its
global pooling), built in memory on first use, so installed models need no rebuild. The
result image is fed whole (squashed to the input size, not centre-cropped) so that the map
covers all of it; each cell's cosine similarity with the query's pooled vector, min-max
scaled, is upsampled bilinearly to the image size and colour-mapped over a dimmed copy.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.embedding import registry
from service.embedding.models import EmbeddingModel
from service.embedding.session import load_once
from service.embedding.transforms import normalise
from service.errors import ApiError
from service.images.decode import ImageDecodeError, open_image, to_rgb
from service.images.storage import ContentStore
from service.text.labels import class_names, softmax
from service.text.models import ImageClasses

FEATURE_MAP = "lookalike_feature_map"
POOLS = ("GlobalAveragePool", "ReduceMean")
PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Identity")
TOP_CLASSES = 5
# The PNG has the result's size up to this many pixels (16 MP), and is scaled down beyond.
MAX_RENDER_PIXELS = 16_000_000


def add_feature_map_output(model: onnx.ModelProto, embedding: str) -> onnx.ModelProto:
    """A copy of the model that also outputs the map that is pooled into `embedding`."""
    producers = {out: node for node in model.graph.node for out in node.output}
    name = embedding
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in POOLS:
            out = onnx.ModelProto()
            out.CopyFrom(model)
            out.graph.output.append(onnx.helper.make_tensor_value_info(
                FEATURE_MAP, onnx.TensorProto.FLOAT, None))
            out.graph.node.append(onnx.helper.make_node(
                "Identity", [node.input[0]], [FEATURE_MAP], name=FEATURE_MAP))
            return out
        if node.op_type not in PASS_THROUGH:
            break
        name = node.input[0]
    raise ApiError("not_explainable", "this model's embedding is not a pooled feature map",
                   status=409)


class ExplainModel:
    """An installed image model with its feature map exposed, run on whole images."""

    def __init__(self, info: registry.ModelInfo, onnx_path: Path) -> None:
        import onnxruntime as ort

        self.info = info
        graph = add_feature_map_output(onnx.load_model(onnx_path), info.outputs[0])
        self.session = ort.InferenceSession(graph.SerializeToString(),
                                            providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, img: PILImage.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """The [C, h, w] feature map and the class logits (if any) of a whole RGB image."""
        size = self.info.input_size
        squashed = img.resize((size, size), PILImage.Resampling.BILINEAR)
        x = normalise(squashed, self.info.preprocessing)[None]
        named = dict(zip(self.outputs, self.session.run(None, {self.info.input_name: x}),
                         strict=True))
        return np.asarray(named[FEATURE_MAP][0], np.float32), named.get("logits")


def get_explain_model(model_dir: str | Path, name: str) -> ExplainModel:
    """The process-wide explain graph of an installed model, built on first use."""
    def load() -> ExplainModel:
        try:
            info = registry.verify(Path(model_dir), name)
        except registry.ModelError as exc:
            raise ApiError("unknown_model", str(exc)) from exc
        return ExplainModel(info, registry.model_path(Path(model_dir), name) / "model.onnx")

    return load_once(("explain", str(model_dir), name), load)


def similarity_grid(feature_map: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of each spatial cell's channel vector with the query vector."""
    channels = feature_map.reshape(feature_map.shape[0], -1).T.astype(np.float64)
    q = np.asarray(query, np.float64)
    norms = np.linalg.norm(channels, axis=1) * max(np.linalg.norm(q), 1e-12)
    cos = channels @ q / np.maximum(norms, 1e-12)
    return cos.reshape(feature_map.shape[1:]).astype(np.float32)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The grid min-max scaled to [0, 1] and resized bilinearly to (width, height)."""
    low, high = float(grid.min()), float(grid.max())
    scaled = (grid - low) / (high - low) if high > low else np.zeros_like(grid)
    resized = PILImage.fromarray(scaled.astype(np.float32), mode="F").resize(
        size, PILImage.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


def render_heatmap(img: PILImage.Image, heat: np.ndarray) -> bytes:
    """The heat colour-mapped (inferno) over a dimmed copy of the image, as PNG bytes."""
    from matplotlib import colormaps

    # A 256-entry colour table indexed by the quantised heat: a few bytes per pixel, so that
    # a large photo does not need float copies of itself.
    table = (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint16)
    colours = table[np.round(heat * 255.0).astype(np.uint8)]
    base = np.asarray(img, np.uint8).astype(np.uint16)
    blended = ((2 * base + 3 * colours) // 5).astype(np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(blended).save(out, "PNG", compress_level=3)
    return out.getvalue()


def shared_classes(p_query: np.ndarray | None, p_result: np.ndarray | None,
                   k: int = TOP_CLASSES) -> list[dict[str, Any]]:
    """Classes both images are likely to show: the top k of p_query * p_result, normalised."""
    if p_query is None or p_result is None:
        return []
    joint = np.asarray(p_query, np.float64) * np.asarray(p_result, np.float64)
    total = joint.sum() or 1.0
    names = class_names()
    return [{"label": names[i], "score": round(float(joint[i] / total), 4),
             "query_p": round(float(p_query[i]), 4), "result_p": round(float(p_result[i]), 4)}
            for i in np.argsort(-joint, kind="stable")[:k]]


@dataclass
class Explanation:
    """A heatmap of where the result matches the query, and the classes they share."""

    result_id: uuid.UUID
    model: str
    width: int
    height: int
    grid: np.ndarray
    similarity: float
    classes: list[dict[str, Any]] = field(default_factory=list)
    png: bytes = b""

    def peak(self) -> dict[str, int]:
        """The centre of the hottest cell, in result-image pixels."""
        rows, cols = self.grid.shape
        r, c = np.unravel_index(int(np.argmax(self.grid)), self.grid.shape)
        return {"x": int((c + 0.5) * self.width / cols), "y": int((r + 0.5) * self.height / rows)}


def _stored_probs(image_id: uuid.UUID, model: EmbeddingModel, *,
                  session: Session) -> np.ndarray | None:
    probs = session.scalar(select(ImageClasses.probs).where(
        ImageClasses.image_id == image_id, ImageClasses.model_id == model.id))
    return None if probs is None else np.asarray(probs, np.float32)


def explain_match(result_id: str, *, session: Session, store: ContentStore, model_dir: str,
                  model_name: str, max_pixels: int, query_id: str | None = None,
                  query_file: bytes | None = None, render: bool = True) -> Explanation:
    """Why `result_id` matched the query (a stored image or uploaded bytes)."""
    from service.embedding import service as embedding
    from service.embedding.session import get_embedder
    from service.images.service import get_image

    if (query_id is None) == (query_file is None):
        raise ApiError("invalid_query", "give exactly one of query_id or file")
    result = get_image(result_id, session=session)
    model = embedding.find_model(model_name, session=session)
    if model is None:
        raise ApiError("unknown_model", f"no images have been embedded with model "
                       f"{model_name!r}")
    explainer = get_explain_model(model_dir, model_name)
    p_query: np.ndarray | None = None
    if query_id is not None:
        query = get_image(query_id, session=session)
        vector = embedding.stored_vector(query.id, model, session=session)
        if vector is None:
            raise ApiError("not_ready", f"image {query.id} has no vector yet", status=409)
        p_query = _stored_probs(query.id, model, session=session)
    else:
        assert query_file is not None
        try:
            out = get_embedder(model_dir, model_name).embed_bytes([query_file],
                                                                  max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise ApiError(exc.code, exc.message) from exc
        vector = out.vectors[0]
        p_query = None if out.logits is None else softmax(out.logits[0])
    try:
        img = to_rgb(open_image(store.get(result.sha256), max_pixels=max_pixels))
    except FileNotFoundError as exc:
        raise ApiError("not_found", f"the file of image {result.id} is missing",
                       status=404) from exc
    except ImageDecodeError as exc:
        raise ApiError(exc.code, exc.message, status=422) from exc
    feature_map, logits = explainer.run(img)
    grid = similarity_grid(feature_map, vector)
    pooled = feature_map.mean(axis=(1, 2))
    cos = float(pooled @ vector / max(np.linalg.norm(pooled) * np.linalg.norm(vector), 1e-12))
    p_result = _stored_probs(result.id, model, session=session)
    if p_result is None and logits is not None:
        p_result = softmax(np.asarray(logits)[0])
    explanation = Explanation(result_id=result.id, model=model_name, width=img.width,
                              height=img.height, grid=grid, similarity=cos,
                              classes=shared_classes(p_query, p_result))
    if render:
        if img.width * img.height > MAX_RENDER_PIXELS:
            # Bounded memory and response size: a huge photo's heatmap comes back scaled down.
            scale = (MAX_RENDER_PIXELS / (img.width * img.height)) ** 0.5
            img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))),
                             PILImage.Resampling.BILINEAR)
        explanation.png = render_heatmap(img, upsample(grid, img.size))
    return explanation


def heat_at(explanation: Explanation) -> np.ndarray:
    """The upsampled [0, 1] heat over the whole result image (height x width)."""
    return upsample(explanation.grid, (explanation.width, explanation.height))

