"""Convert pretrained PyTorch checkpoints to ONNX models without PyTorch."""

from service.embedding.convert.checkpoint import CheckpointError, load_checkpoint
from service.embedding.convert.efficientnet_lite import (
    VARIANTS,
    build_efficientnet_lite,
    convert_efficientnet_lite,
)
from service.embedding.convert.graph import WeightsError

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "WeightsError",
    "build_efficientnet_lite",
    "convert_efficientnet_lite",
    "load_checkpoint",
]
