"""Retrieval heads on the shared clothing set, split by sender_id (no person on both sides).

Reports test-split mAP and P@10 for raw EfficientNet-Lite0 features, PCA whitening at a few
shrinkages, the supervised head trained on all training images, and with 5, 10 and 20 shots
per class. Uses the same functions as `lookalike finetune`.

    python -m bench.training
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import append_results, clothing_embeddings
from service.evaluation.metrics import exact_cosine_scores
from service.training.heads import fit_classifier, fit_pca_whitening
from service.training.service import _side


def main() -> None:
    vectors, rows = clothing_embeddings()
    vectors = vectors.astype(np.float16).astype(np.float32)  # as stored in halfvec
    labels = np.array([r["label"] for r in rows])
    senders = [r["sender_id"] for r in rows]
    test = np.array([_side(s) for s in senders])
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    classes = sorted(set(labels[train_idx].tolist()))
    y = np.array([classes.index(v) for v in labels[train_idx]])
    test_labels = labels[test_idx].tolist()
    lines = [f"Train {len(train_idx)} / test {len(test_idx)} images, {len(classes)} classes, "
             "split by sender_id; exact cosine over the test split, each image a query.", "",
             "| features | dim | test mAP | test P@10 | fit s |", "|---|---|---|---|---|"]

    def row(name: str, feats: np.ndarray, seconds: float = 0.0) -> None:
        s = exact_cosine_scores(feats, test_labels, ks=(10,))
        lines.append(f"| {name} | {feats.shape[1]} | {s.mean_ap:.3f} | {s.precision[10]:.3f} | "
                     f"{seconds:.1f} |")
        print(lines[-1])

    row("raw efficientnet-lite0 pooled", vectors[test_idx])
    for power in (1.0, 0.5):
        for shrink in (0.0, 0.5, 1.0):
            t0 = time.perf_counter()
            head = fit_pca_whitening(vectors[train_idx], dim=256, shrinkage=shrink, power=power)
            row(f"PCA-whitening, power {power}, shrinkage {shrink}",
                head.transform(vectors[test_idx]), time.perf_counter() - t0)
    val = np.array([_side(senders[i] + "/val", 5) for i in train_idx])
    t0 = time.perf_counter()
    head = fit_classifier(vectors[train_idx][~val], y[~val], classes,
                          val_x=vectors[train_idx][val], val_labels=labels[train_idx][val].tolist())
    row("classifier head, all training images", head.transform(vectors[test_idx]),
        time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    for shots in (5, 10, 20):
        pick = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:shots]
                               for c in range(len(classes))])
        t0 = time.perf_counter()
        head = fit_classifier(vectors[train_idx][pick], y[pick], classes, max_iter=100)
        row(f"classifier head, {shots} shots per class", head.transform(vectors[test_idx]),
            time.perf_counter() - t0)
    append_results("Retrieval heads on the clothing set", "\n".join(lines))


if __name__ == "__main__":
    main()
