"""Heads on pooled features: what a fitted head is, the logistic classifier, PCA whitening.

All start with the same input transform, a square root of the positive part (power
normalisation) and standardisation, so that the ONNX export is a short chain of elementwise
ops and MatMuls. The logistic classifier's loss and gradient come from an ONNX graph
(head_graph.py); the cosine classifier is trained in cosine.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from service.evaluation.metrics import exact_cosine_scores
from service.training.head_graph import NORM_EPS, ClassifierStep
from service.training.tails import GraphTail

__all__ = ["NORM_EPS", "Head", "fit_classifier", "fit_pca_whitening"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + NORM_EPS)


@dataclass
class Head:
    """x -> softmax((max(x, 0)^power - mean) / scale @ weight + bias); no softmax for PCA.

    With `hidden_weight`, a ReLU layer comes before `weight`; with `cosine`, the input of
    `weight` is L2-normalised (the scale and temperature are folded into `weight`); with
    `mix`, the output is [unit(hidden), mix · unit(softmax)], the penultimate features with
    the class probabilities appended. With `tail`, the backbone's last layers were re-trained
    too: the head's input are the feature maps that feed them (`transform_maps`).
    """

    kind: str
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    softmax: bool
    power: float = 0.5
    record: dict = field(default_factory=dict)
    hidden_weight: np.ndarray | None = None
    hidden_bias: np.ndarray | None = None
    cosine: bool = False
    mix: float | None = None
    tail: GraphTail | None = None

    @property
    def dim(self) -> int:
        """Size of the embedding the head outputs."""
        classes = int(self.weight.shape[1])
        return classes + int(self.weight.shape[0]) if self.mix is not None else classes

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply the head in numpy (the ONNX graph computes the same)."""
        h = (np.maximum(x, 0) ** self.power - self.mean) / self.scale
        if self.hidden_weight is not None and self.hidden_bias is not None:
            h = np.maximum(h @ self.hidden_weight + self.hidden_bias, 0)
        out = (_unit(h) if self.cosine else h) @ self.weight + self.bias
        if self.softmax:
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out /= out.sum(axis=1, keepdims=True)
        if self.mix is not None:
            out = np.concatenate([_unit(h), self.mix * _unit(out)], axis=1)
        return out.astype(np.float32)

    def transform_maps(self, maps: np.ndarray) -> np.ndarray:
        """Apply the re-trained tail, then the head, to (N, C, H, W) feature maps."""
        if self.tail is None:
            raise ValueError("this head takes pooled features, not feature maps")
        return self.transform(self.tail.pool(maps))


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.sqrt(np.maximum(x, 0))
    mean = z.mean(axis=0)
    scale = z.std(axis=0) + 1e-6
    return (z - mean) / scale, mean, scale


def fit_classifier(x: np.ndarray, y: np.ndarray, classes: list[str], *,
                   val_x: np.ndarray | None = None, val_labels: list[str] | None = None,
                   l2: float = 1e-2, max_iter: int = 300, seed: int = 0) -> Head:
    """Multinomial logistic regression; its class probabilities are the embedding.

    The `--head linear` option: on the clothing set it scores below the cosine MLP head, most
    of all without augmentation (docs/training.md). Iterations are early-stopped on the
    validation mAP when a validation split is given.
    """
    z, mean, scale = _standardise(x)
    z, d, c = z.astype(np.float64), z.shape[1], len(classes)  # float64: L-BFGS's tolerances
    graph = ClassifierStep(d, c, l2)
    target = np.eye(c)[y]

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        loss, dw, db = graph.loss_grad(z, target, theta[: d * c].reshape(d, c), theta[d * c:])
        return loss, np.concatenate([dw.ravel(), db])

    theta = np.zeros(d * c + c)
    best: tuple[float, np.ndarray, int] = (-1.0, theta, 0)
    history = []
    step = 25 if val_x is not None else max_iter
    done = 0
    while done < max_iter:
        result = minimize(loss_grad, theta, jac=True, method="L-BFGS-B",
                          options={"maxiter": step})
        theta, done = result.x, done + step
        if val_x is None or val_labels is None:
            best = (0.0, theta, done)
            break
        head = _classifier_head(theta, mean, scale, d, c)
        score = exact_cosine_scores(head.transform(val_x), val_labels, ks=(10,)).mean_ap
        history.append({"iterations": done, "loss": float(result.fun), "val_map": score})
        if score > best[0]:
            best = (score, theta, done)
        elif done - best[2] >= 2 * step:
            break  # no gain for two rounds: stop early
    head = _classifier_head(best[1], mean, scale, d, c)
    head.record = {"loss": "softmax cross-entropy + L2", "l2": l2, "iterations": best[2],
                   "history": history, "classes": classes, "seed": seed}
    return head


def _classifier_head(theta: np.ndarray, mean: np.ndarray, scale: np.ndarray, d: int,
                     c: int) -> Head:
    return Head(kind="classifier", mean=mean, scale=scale,
                weight=theta[: d * c].reshape(d, c).astype(np.float32),
                bias=theta[d * c:].astype(np.float32), softmax=True)


def fit_pca_whitening(x: np.ndarray, *, dim: int = 256, shrinkage: float = 1.0,
                      power: float = 1.0) -> Head:
    """Power-normalise, centre, project on the top `dim` components, whiten with shrinkage.

    Eigenvalues are shrunk towards their mean, λ' = (1 − s)·λ + s·mean(λ), before scaling by
    λ'^(-1/2): s = 0 is full whitening, s = 1 a plain PCA projection.
    """
    z = np.maximum(x, 0) ** power
    mean = z.mean(axis=0)
    _, sing, vt = np.linalg.svd(z - mean, full_matrices=False)
    dim = min(dim, vt.shape[0])
    eig = sing[:dim] ** 2 / max(len(z) - 1, 1)
    shrunk = (1 - shrinkage) * eig + shrinkage * eig.mean()
    weight = (vt[:dim].T / np.sqrt(shrunk)).astype(np.float32)
    return Head(kind="pca-whiten", mean=mean.astype(np.float32),
                scale=np.ones_like(mean, dtype=np.float32), weight=weight,
                bias=np.zeros(dim, dtype=np.float32), softmax=False, power=power,
                record={"dim": dim, "shrinkage": shrinkage, "power": power})
