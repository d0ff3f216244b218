"""Heads fitted in numpy/scipy on pooled features: softmax classifiers and PCA whitening.

All start with the same input transform, a signed square root (power normalisation) and
standardisation, so that the ONNX export is a short chain of elementwise ops and MatMuls.

Over 300 lines: the head kinds share the input transform and the fitting loop; they are
kept together until training computes every gradient one way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from service.evaluation.metrics import exact_cosine_scores
from service.training.tail import TAIL_LR, Tail
from service.training.top import GraphTail

NORM_EPS = 1e-6  # added to L2 norms so that an all-zero row stays finite
# Below this, the square root's slope is taken at this value: a channel that the activation
# zeroes everywhere would otherwise get an infinite gradient.
SQRT_FLOOR = 1e-4


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
    tail: Tail | GraphTail | None = None

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


def fit_cosine_head(x: np.ndarray, y: np.ndarray, classes: list[str], *,
                    val_x: np.ndarray | None = None, val_labels: list[str] | None = None,
                    hidden: int = 512, scale: float = 16.0, smoothing: float = 0.1,
                    dropout: float = 0.5, weight_decay: float = 1e-4, lr: float = 1e-3,
                    epochs: int = 10, batch_size: int = 256, mix: float | None = 1.0,
                    tolerance: float = 0.005, tail: Tail | GraphTail | None = None,
                    tail_lr: float | None = None, positions: float = 0.5,
                    groups: np.ndarray | None = None, layer_scaled: bool = False,
                    tail_warmup: float = 0.0, seed: int = 0,
                    on_epoch: Callable[[int, int], None] | None = None) -> Head:
    """A ReLU layer and a normalised-softmax (cosine) classifier, trained with Adam.

    Loss: label-smoothed cross-entropy on `scale` · cos(hidden, class weight); dropout on the
    hidden layer; an L2 penalty on the weights; cosine learning-rate decay. With a validation
    split the latest epoch within `tolerance` of the best validation mAP is kept, and `mix` is
    then picked on it too. The embedding is the hidden layer with the class probabilities
    appended (`mix`), or only the probabilities when `mix` is None: the probabilities alone
    lose the within-class ordering that the hidden layer keeps.

    With `tail`, `x` and `val_x` are the feature maps (N, C, H, W) that feed the backbone's
    last layers, and these are trained too: from their pretrained weights, at `tail_lr`
    (default by the tail's depth, TAIL_LR), the weight decay pulling towards them; a tail of
    1x1 convolutions only sees a random share (`positions`) of the map's positions per batch
    (cheaper, and a little augmentation). With `groups` (the image of each row), an epoch
    takes one row of each image, at random: an image's views take turns. With
    `layer_scaled`, each re-trained weight's rate is `tail_lr` times its pretrained RMS over
    the median RMS of the tail's weights; over the first `tail_warmup` epochs the tail's rate
    rises linearly from zero. `on_epoch(done, epochs)` is called after each epoch.
    """
    firsts = None if groups is None else np.unique(groups, return_index=True)[1]
    if tail is None:
        z, mean, std = _standardise(x)
    else:  # the input standardisation stays the one of the pretrained tail's features
        z, (_, mean, std) = x, _standardise(tail.pool(x if firsts is None else x[firsts]))
    rng = np.random.default_rng(seed)
    n, d = len(z), len(mean)
    c = len(classes)
    width = hidden or d
    params = {"w2": rng.normal(0, np.sqrt(1 / width), (width, c)).astype(np.float32)}
    if hidden:
        params["w1"] = rng.normal(0, np.sqrt(2 / d), (d, hidden)).astype(np.float32)
        params["b1"] = np.zeros(hidden, np.float32)
    pretrained = tail.params() if tail is not None else {}
    if tail is not None and tail_lr is None:
        tail_lr = TAIL_LR[tail.depth]
    params.update({k: v.copy() for k, v in pretrained.items()})
    rates = layer_rates(pretrained) if layer_scaled else dict.fromkeys(pretrained, 1.0)
    kept = max(1, round(x.shape[2] * x.shape[3] * positions)) if tail is not None else 0
    moment = {k: np.zeros_like(v) for k, v in params.items()}
    second = {k: np.zeros_like(v) for k, v in params.items()}
    target = np.full((n, c), smoothing / c, np.float32)
    target[np.arange(n), y] += 1 - smoothing
    if tail is None:
        z = z.astype(np.float32)

    def head_of(p: dict[str, np.ndarray], mix_value: float | None) -> Head:
        w2 = p["w2"] / (np.linalg.norm(p["w2"], axis=0, keepdims=True) + NORM_EPS)
        tuned = None if tail is None else tail.with_params({k: p[k] for k in pretrained})
        return Head(kind="cosine-mlp" if hidden else "cosine", mean=mean, scale=std,
                    weight=(scale * w2).astype(np.float32), bias=np.zeros(c, np.float32),
                    softmax=True, hidden_weight=p.get("w1"), hidden_bias=p.get("b1"),
                    cosine=True, mix=mix_value, tail=tuned)

    def val_map(head: Head) -> float:
        assert val_x is not None and val_labels is not None
        out = head.transform(val_x) if tail is None else head.transform_maps(val_x)
        return exact_cosine_scores(out, val_labels, ks=(10,)).mean_ap

    history: list[dict[str, float]] = []
    snapshots: list[dict[str, np.ndarray]] = []
    steps = 0
    rows = n if firsts is None else len(firsts)  # per epoch
    warmup_steps = tail_warmup * -(-rows // batch_size)
    for epoch in range(epochs):
        decay = 0.5 * (1 + np.cos(np.pi * epoch / epochs))  # cosine, for head and tail
        order = epoch_order(rng, n, groups)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if tail is None:
                grads = _cosine_grads(params, z[idx], target[idx], scale, dropout, rng)
            else:
                idx = np.sort(idx)  # sorted: faster gathers from the large map array
                grads = _tail_grads(params, z[idx], target[idx], mean, std, tail, scale,
                                    dropout, rng, kept)
            steps += 1
            warm = steps / (warmup_steps + 1) if steps <= warmup_steps else 1.0
            for k, g in grads.items():
                step = lr * decay
                if k in pretrained:  # decay towards the pretrained layers, not towards zero
                    if k.endswith("w"):
                        g = g + weight_decay * (params[k] - pretrained[k])
                    assert tail_lr is not None
                    step = tail_lr * rates[k] * decay * warm
                elif k.startswith("w"):
                    g = g + weight_decay * params[k]  # L2 penalty on the weights
                moment[k] = 0.9 * moment[k] + 0.1 * g
                second[k] = 0.999 * second[k] + 0.001 * g * g
                update = (moment[k] / (1 - 0.9 ** steps)) / (
                    np.sqrt(second[k] / (1 - 0.999 ** steps)) + 1e-8)
                params[k] = (params[k] - step * update).astype(np.float32)
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
        if val_x is not None:
            score = val_map(head_of(params, mix))
            history.append({"epoch": epoch + 1, "val_map": score})
            snapshots.append({k: v.copy() for k, v in params.items()})
    best: tuple[dict[str, np.ndarray], int] = (params, epochs)
    if history:
        # The latest epoch within `tolerance` of the best validation mAP: a small validation
        # split's curve is flat within its noise, and its argmax landed on epochs 1 to 3,
        # which left the head under-trained (docs/training.md).
        top = max(h["val_map"] for h in history)
        last = max(i for i, h in enumerate(history) if h["val_map"] >= top - tolerance)
        best = (snapshots[last], last + 1)
    chosen = mix
    if val_x is not None and mix is not None:
        # The weight of the probabilities against the hidden layer, picked on validation.
        chosen = max((0.5 * mix, mix, 2 * mix), key=lambda m: val_map(head_of(best[0], m)))
    head = head_of(best[0], chosen)
    head.record = {"loss": "label-smoothed normalised-softmax cross-entropy", "hidden": hidden,
                   "scale": scale, "smoothing": smoothing, "dropout": dropout,
                   "weight_decay": weight_decay, "lr": lr, "epochs": best[1], "mix": chosen,
                   "tolerance": tolerance,
                   "history": history, "classes": classes, "seed": seed}
    if firsts is not None:
        head.record["rows_per_epoch"] = int(len(firsts))
    if tail is not None:
        head.record["tail"] = {"lr": tail_lr, "layer_scaled": layer_scaled,
                               "warmup_epochs": tail_warmup,
                               "layers": tail.nodes, "tap": tail.tap,
                               **({} if tail.spatial else {"positions": positions})}
    return head


def layer_rates(weights: dict[str, np.ndarray]) -> dict[str, float]:
    """Each weight's pretrained RMS over the median RMS of the weights; 1 for biases."""
    # Adam moves every weight by about the learning rate per step, whatever its size; the
    # BN-folded convolutions' weights differ 50-fold in scale (lite0's expansion convs about
    # 0.01, its depthwise ones about 0.5), so one rate rewrites some layers and barely
    # touches others.
    rms = {k: float(np.sqrt(np.mean(np.square(v, dtype=np.float64))))
           for k, v in weights.items() if v.ndim > 1}
    ref = float(np.median(list(rms.values()))) if rms else 0.0
    return {k: rms[k] / ref if k in rms and ref > 0 else 1.0 for k in weights}


def epoch_order(rng: np.random.Generator, n: int,
                groups: np.ndarray | None = None) -> np.ndarray:
    """The rows of one epoch in a random order: all `n`, or one random row of each group."""
    order = rng.permutation(n)
    if groups is None:
        return order
    return rng.permutation(order[np.unique(groups[order], return_index=True)[1]])


def _tail_grads(p: dict[str, np.ndarray], maps: np.ndarray, target: np.ndarray,
                mean: np.ndarray, std: np.ndarray, tail: Tail | GraphTail, scale: float,
                dropout: float, rng: np.random.Generator, kept: int) -> dict[str, np.ndarray]:
    """Gradients of the cosine classifier's loss down through the tail, on one batch."""
    x = np.asarray(maps, np.float32)
    if not tail.spatial and kept < x.shape[2] * x.shape[3]:
        n, c = x.shape[:2]
        x = x.reshape(n, c, -1)[:, :, np.sort(rng.choice(x.shape[2] * x.shape[3], kept,
                                                         replace=False))][..., None]
    pooled, inputs = tail.forward(x, p, keep=True)
    root = np.sqrt(np.maximum(pooled, 0))
    grads = _cosine_grads(p, (root - mean) / std, target, scale, dropout, rng, want_input=True)
    g_pooled = grads.pop("z") / std * 0.5 / np.maximum(root, np.sqrt(SQRT_FLOOR))
    grads.update(tail.backward(g_pooled, p, inputs))
    return grads


def _cosine_grads(p: dict[str, np.ndarray], z: np.ndarray, target: np.ndarray, scale: float,
                  dropout: float, rng: np.random.Generator,
                  want_input: bool = False) -> dict[str, np.ndarray]:
    """Gradients of the mean cross-entropy of the cosine classifier on one batch.

    With `want_input`, also the gradient with respect to the input rows, as "z".
    """
    grads: dict[str, np.ndarray] = {}
    h, pre, keep = z, None, None
    if "w1" in p:
        pre = z @ p["w1"] + p["b1"]
        h = np.maximum(pre, 0)
        if dropout:
            keep = (rng.random(h.shape) >= dropout) / (1 - dropout)
            h = h * keep
    h_norm = np.linalg.norm(h, axis=1, keepdims=True) + NORM_EPS
    w_norm = np.linalg.norm(p["w2"], axis=0, keepdims=True) + NORM_EPS
    u, v = h / h_norm, p["w2"] / w_norm
    logits = scale * (u @ v)
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    g = scale * (prob - target) / len(z)
    gu, gv = g @ v.T, u.T @ g
    grads["w2"] = (gv - v * (gv * v).sum(axis=0, keepdims=True)) / w_norm
    gh = (gu - u * (gu * u).sum(axis=1, keepdims=True)) / h_norm
    if pre is not None:
        if keep is not None:
            gh = gh * keep
        gpre = gh * (pre > 0)
        grads["w1"] = z.T @ gpre
        grads["b1"] = gpre.sum(axis=0)
        if want_input:
            grads["z"] = gpre @ p["w1"].T
    elif want_input:
        grads["z"] = gh
    return grads


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
