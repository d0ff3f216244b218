"""Heads fitted in numpy/scipy on pooled features: a softmax classifier and PCA whitening.

Both start with the same input transform, a signed square root (power normalisation) and
standardisation, so that the ONNX export is one short chain of elementwise ops and a MatMul.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from service.evaluation.metrics import exact_cosine_scores


@dataclass
class Head:
    """x -> softmax((max(x, 0)^power - mean) / scale @ weight + bias); no softmax for PCA."""

    kind: str
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    softmax: bool
    power: float = 0.5
    record: dict = field(default_factory=dict)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply the head in numpy (the ONNX graph computes the same)."""
        z = (np.maximum(x, 0) ** self.power - self.mean) / self.scale
        out = z @ self.weight + self.bias
        if self.softmax:
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out /= out.sum(axis=1, keepdims=True)
        return out.astype(np.float32)


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.sqrt(np.maximum(x, 0))
    mean = z.mean(axis=0)
    scale = z.std(axis=0) + 1e-6
    return (z - mean) / scale, mean, scale


def fit_classifier(x: np.ndarray, y: np.ndarray, classes: list[str], *,
                   val_x: np.ndarray | None = None, val_labels: list[str] | None = None,
                   l2: float = 1e-2, max_iter: int = 300, seed: int = 0) -> Head:
    """Multinomial logistic regression; its class probabilities are the embedding.

    Measured on the clothing set: normalised-softmax (proxy) heads overfit within a few dozen
    iterations, while the classifier's probability vectors retrieve best (docs/training.md).
    Iterations are early-stopped on the validation mAP when a validation split is given.
    """
    z, mean, scale = _standardise(x)
    n, d = z.shape
    c = len(classes)

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: d * c].reshape(d, c), theta[d * c:]
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.log(p[np.arange(n), y] + 1e-12).mean() + l2 * float((w ** 2).sum())
        g = p
        g[np.arange(n), y] -= 1
        g /= n
        return loss, np.concatenate([(z.T @ g + 2 * l2 * w).ravel(), g.sum(axis=0)])

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
