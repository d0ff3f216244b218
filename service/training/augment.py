"""Training-time augmentation: extra views of each training image, embedded by the backbone.

The head is fitted on pooled features, so augmenting means embedding mirrored and re-cropped
copies of the training photos once per run; the views are the cheap, label-preserving ones
(a shop photo mirrored or framed a little wider or tighter is still the same kind of item).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

from service.embedding.transforms import Preprocessing, normalise, resize_and_crop
from service.images.decode import open_image, to_rgb

# Shorter side over the model's `resize`: wider shows the whole shorter side, tighter zooms in.
SCALES = {"wide": None, "centre": 1.0, "tight": 1.25}
VIEWS = ("centre-flip", "wide", "wide-flip", "tight", "tight-flip")


def views(data: bytes, prep: Preprocessing, *, max_pixels: int,
          names: Iterable[str] = VIEWS) -> list[np.ndarray]:
    """The named views of one encoded image as model inputs (CHW float32)."""
    names = list(names)
    img = to_rgb(open_image(data, max_pixels=max_pixels,
                            draft_size=round(prep.resize * SCALES["tight"])))
    out = []
    for name in names:
        scale_name, _, flip = name.partition("-")
        if scale_name not in SCALES or flip not in ("", "flip"):
            raise ValueError(f"unknown augmentation view {name!r}")
        scale = SCALES[scale_name]
        resize = prep.size if scale is None else round(prep.resize * scale)
        view = resize_and_crop(img, resize=resize, size=prep.size)
        if flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(normalise(view, prep))
    return out


def embed_views(items: Iterable[bytes], run: Callable[[np.ndarray], np.ndarray],
                prep: Preprocessing, *, max_pixels: int, names: Iterable[str] = VIEWS,
                batch_size: int = 32) -> np.ndarray:
    """Features of every view of every image, shape (images, views, dim)."""
    names = list(names)
    pending: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    count = 0
    for data in items:
        pending += views(data, prep, max_pixels=max_pixels, names=names)
        count += 1
        while len(pending) >= batch_size:
            feats.append(run(np.ascontiguousarray(np.stack(pending[:batch_size]))))
            pending = pending[batch_size:]
    if pending:
        feats.append(run(np.ascontiguousarray(np.stack(pending))))
    if not feats:
        return np.zeros((0, len(names), 0), np.float32)
    out = np.concatenate(feats)  # in the runner's dtype: feature maps stay float16
    return out.reshape(count, len(names), -1)
