"""Convert pretrained PyTorch checkpoints to ONNX models without PyTorch."""

from service.embedding.convert.checkpoint import CheckpointError, load_checkpoint
from service.embedding.convert.efficientnet_lite import (
    VARIANTS,
    build_efficientnet_lite,
    convert_efficientnet_lite,
)
from service.embedding.convert.mobilenetv2 import build_mobilenetv2, convert_mobilenetv2
from service.embedding.convert.weights import WeightsError

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "WeightsError",
    "build_efficientnet_lite",
    "build_mobilenetv2",
    "convert_efficientnet_lite",
    "convert_mobilenetv2",
    "load_checkpoint",
]
