"""State dicts as the graph builders read them: every tensor checked and accounted for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import DTypeLike


class WeightsError(ValueError):
    """The weights do not fit the architecture (missing, unused or misshapen tensors)."""


class Weights:
    """A state dict that records which entries were used, to catch a wrong architecture."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self._weights = dict(weights)
        self._used: set[str] = set()

    def get(self, name: str, shape: Sequence[int] | None = None, *,
            dtype: DTypeLike = np.float64) -> np.ndarray:
        """The tensor `name` as `dtype`, checked against `shape` when given."""
        if name not in self._weights:
            raise WeightsError(f"weights have no tensor {name!r}; wrong model or variant?")
        array = np.asarray(self._weights[name])
        if shape is not None and tuple(array.shape) != tuple(shape):
            raise WeightsError(
                f"tensor {name!r} has shape {tuple(array.shape)}, the architecture needs "
                f"{tuple(shape)}; wrong model or variant?"
            )
        self._used.add(name)
        # float64 by default so that weights folded together (batch norm into a conv) are as
        # close as float32 allows once cast back.
        return array.astype(dtype)

    def check_all_used(self, ignore_suffixes: Sequence[str] = ()) -> None:
        """Raise if any tensor was never used: the weights are for a bigger model."""
        unused = [
            name
            for name in self._weights
            if name not in self._used and not name.endswith(tuple(ignore_suffixes))
        ]
        if unused:
            shown = ", ".join(sorted(unused)[:5])
            raise WeightsError(f"{len(unused)} tensors were not used ({shown}...); wrong variant?")


def fold_batch_norm(
    weight: np.ndarray,
    bias: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold inference-mode batch norm into the preceding conv's weight and bias."""
    scale = gamma / np.sqrt(var + eps)
    folded_w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    folded_b = beta - mean * scale
    if bias is not None:
        folded_b = folded_b + bias * scale
    return folded_w.astype(np.float32), folded_b.astype(np.float32)
