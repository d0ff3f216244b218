"""The cosine classifier head, trained with Adam, and the backbone's tail under it.

Each step's gradients come from one ONNX graph (head_graph.py: the tail's layers, the head,
the loss's seed) run by onnxruntime; this module holds the loop around it: batches, dropout
masks, the positions a pointwise tail sees, the optimiser (Adam, with its L2 weight decay
and learning-rate schedule) and the choice of epoch and mix on validation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.evaluation.metrics import exact_cosine_scores
from service.training.head_graph import NORM_EPS, CosineStep
from service.training.heads import Head, _standardise
from service.training.tails import TAIL_LR, GraphTail

# The share of a map's positions that a pointwise tail sees per batch (cheaper, and a little
# augmentation); the training step's graph is built for that many positions.
POSITIONS = 0.5


def fit_cosine_head(x: np.ndarray, y: np.ndarray, classes: list[str], *,
                    val_x: np.ndarray | None = None, val_labels: list[str] | None = None,
                    hidden: int = 512, scale: float = 16.0, smoothing: float = 0.1,
                    dropout: float = 0.5, weight_decay: float = 1e-4, lr: float = 1e-3,
                    epochs: int = 10, batch_size: int = 256, mix: float | None = 1.0,
                    tolerance: float = 0.005, tail: GraphTail | None = None,
                    tail_lr: float | None = None, positions: float | None = None,
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
    positions = POSITIONS if positions is None else positions
    kept = max(1, round(x.shape[2] * x.shape[3] * positions)) if tail is not None else 0
    moment = {k: np.zeros_like(v) for k, v in params.items()}
    second = {k: np.zeros_like(v) for k, v in params.items()}
    target = np.full((n, c), smoothing / c, np.float32)
    target[np.arange(n), y] += 1 - smoothing
    if tail is None:
        z = z.astype(np.float32)
    steps_for: dict[tuple[int, ...], CosineStep] = {}  # by a batch row's shape

    def step_for(shape: tuple[int, ...]) -> CosineStep:
        if shape not in steps_for:
            steps_for[shape] = CosineStep(params, scale=scale, dropout=dropout > 0,
                                          input_shape=shape, tail=tail, mean=mean, std=std)
        return steps_for[shape]

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
                batch = z[idx]
            else:
                idx = np.sort(idx)  # sorted: faster gathers from the large map array
                batch = _positions(np.asarray(z[idx], np.float32), tail, kept, rng)
            keep = None
            if hidden and dropout:
                keep = (rng.random((len(idx), hidden)) >= dropout) / (1 - dropout)
            grads = step_for(batch.shape[1:]).grads(batch, target[idx], params, keep)
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
                    g = g + weight_decay * params[k]  # the optimiser's L2 weight decay
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


def _positions(maps: np.ndarray, tail: GraphTail, kept: int,
               rng: np.random.Generator) -> np.ndarray:
    """A batch of maps with only `kept` random positions, (N, C, kept, 1), when the tail is
    pointwise (its layers see each position alone); else the maps as they are."""
    if tail.spatial or kept >= maps.shape[2] * maps.shape[3]:
        return maps
    n, c = maps.shape[:2]
    chosen = np.sort(rng.choice(maps.shape[2] * maps.shape[3], kept, replace=False))
    return np.ascontiguousarray(maps.reshape(n, c, -1)[:, :, chosen][..., None])
