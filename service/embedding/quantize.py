"""INT8 variants of installed models, made with ONNX Runtime's static quantization."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from service.embedding.transforms import Preprocessing, batch, preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
CALIBRATION_LIMIT = 64


class _Reader(CalibrationDataReader):
    """Feeds preprocessed calibration images one batch at a time."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self._items: Iterator[dict[str, np.ndarray]] = iter(
            [{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def calibration_images(folder: str | Path | None = None) -> list[bytes]:
    """Photos to calibrate activation ranges: a given folder, else scikit-image's samples."""
    folder = folder or os.environ.get("LOOKALIKE_CALIBRATION_DIR")
    if folder is None:
        try:
            import skimage
        except ImportError as exc:
            raise ValueError("INT8 calibration needs photos: set LOOKALIKE_CALIBRATION_DIR "
                             "to a folder of typical images") from exc
        folder = Path(skimage.__file__).parent / "data"
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no calibration images in {folder}")
    step = max(1, len(files) // CALIBRATION_LIMIT)
    return [p.read_bytes() for p in files[::step][:CALIBRATION_LIMIT]]


def quantize_model(model: onnx.ModelProto, prep: Preprocessing, images: list[bytes],
                   input_name: str = "image") -> onnx.ModelProto:
    """Static QDQ INT8 (per-channel weights, percentile-calibrated activations)."""
    arrays = []
    for data in images:
        try:
            arrays.append(preprocess(data, prep, max_pixels=100_000_000))
        except ValueError:
            continue  # an unreadable calibration file is skipped, not fatal
    if not arrays:
        raise ValueError("none of the calibration images could be decoded")
    # One image per batch: the percentile calibrator needs equally shaped batches.
    batches = [batch([arr]) for arr in arrays]
    with tempfile.TemporaryDirectory() as tmp:
        raw, src, dst = Path(tmp) / "raw.onnx", Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, raw)
        # ORT's recommended pre-pass (shape inference, graph optimisation) lets more of the
        # graph fuse into integer kernels.
        quant_pre_process(str(raw), str(src), skip_symbolic_shape=True)
        quantize_static(
            str(src), str(dst), _Reader(input_name, batches),
            # 7-bit weights: without VNNI (AVX2 CPUs such as AMD EPYC) ORT's U8S8 kernels
            # sum pairs of products in int16 and saturate; the full 8 bits cost a lite0
            # embedding cosine 0.78 to its fp32 one there (docs/models.md).
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": 99.99},
        )
        return onnx.load_model(dst)
