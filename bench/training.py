"""Retrieval heads on the shared clothing set, split by sender_id (no person on both sides).

Reports test-split mAP and P@10, per backbone, for raw pooled features, PCA whitening at a few
shrinkages, the linear softmax head and the cosine-classifier MLP head, with and without the
augmentation views, on all training images and with 5, 10 and 20 shots per class. Every head
is fitted by `service.training.service.train_head`, which `lookalike finetune` runs; the
hyperparameters were chosen on the validation split inside the training side, never on test.

    python -m bench.training [--models efficientnet-lite0,efficientnet-lite2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from bench.harness import BENCH_DIR, CLOTHING, append_results, clothing_embeddings
from service.evaluation.metrics import exact_cosine_scores
from service.training.augment import VIEWS, embed_views
from service.training.heads import fit_pca_whitening
from service.training.service import _side, pick_shots, train_head

SHOTS = (5, 10, 20)
SEEDS = 3  # draws of the shots (and seeds of the head) averaged


def clothing_views(model_name: str, rows: list[dict[str, str]]) -> np.ndarray:
    """Backbone features of every photo's augmentation views (cached under var/bench)."""
    from service.config import settings_from_env
    from service.embedding.session import get_embedder

    cache = BENCH_DIR / f"clothing-views-{model_name}.npy"
    if cache.exists():
        views = np.load(cache)
        if views.shape[:2] == (len(rows), len(VIEWS)):
            return views.astype(np.float32)
    embedder = get_embedder(settings_from_env()["MODEL_DIR"], model_name)
    started = time.perf_counter()
    views = embed_views(((CLOTHING / r["file"]).read_bytes() for r in rows),
                        lambda b: embedder.run(b).vectors, embedder.info.preprocessing,
                        max_pixels=10**8)
    print(f"embedded {len(VIEWS)} views of {len(rows)} photos in "
          f"{time.perf_counter() - started:.0f}s")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    np.save(cache, views.astype(np.float16))  # as the stored vectors: half precision
    return views.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet-lite0,efficientnet-lite2")
    parser.add_argument("--shots-only", action="store_true",
                        help="Skip the heads on all training images.")
    args = parser.parse_args()
    lines = ["Split by sender_id (one sender in three on the test side); exact cosine over the "
             "test split, each test image a query. Heads are fitted on the training side "
             "(early stopping, epochs and the embedding's mix chosen on a validation split of "
             "other senders inside it; with shots there is no validation). `aug`: "
             f"{len(VIEWS)} extra views of each fitted image ({', '.join(VIEWS)}).", "",
             "| backbone | features | dim | test mAP | test P@10 | fit s |",
             "|---|---|---|---|---|---|"]
    for model_name in args.models.split(","):
        bench_model(model_name, lines, shots_only=args.shots_only)
    append_results("Retrieval heads on the clothing set", "\n".join(lines))


def bench_model(model_name: str, lines: list[str], *, shots_only: bool) -> None:
    """Append one backbone's rows to the table."""
    vectors, rows = clothing_embeddings(model_name)
    vectors = vectors.astype(np.float16).astype(np.float32)  # as stored in halfvec
    views = clothing_views(model_name, rows)
    labels = np.array([r["label"] for r in rows])
    senders = [r["sender_id"] for r in rows]
    test = np.array([_side(s) for s in senders])
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    classes = sorted(set(labels[train_idx].tolist()))
    test_labels = labels[test_idx].tolist()
    if not lines[0].startswith("Train"):
        lines.insert(0, f"Train {len(train_idx)} / test {len(test_idx)} images, "
                        f"{len(classes)} classes.")

    def row(name: str, fit: Callable[[], np.ndarray]) -> None:
        started = time.perf_counter()
        feats = fit()
        seconds = time.perf_counter() - started
        s = exact_cosine_scores(feats, test_labels, ks=(10,))
        lines.append(f"| {model_name} | {name} | {feats.shape[1]} | {s.mean_ap:.3f} | "
                     f"{s.precision[10]:.3f} | {seconds:.1f} |")
        print(lines[-1], flush=True)

    def head(kind: str, augment: bool, shots: int | None = None, seed: int = 0) -> np.ndarray:
        fit_idx = pick_shots(labels, train_idx, classes, shots, seed) if shots else train_idx
        fitted = train_head(vectors, labels, senders, fit_idx, classes, validate=not shots,
                            head_kind=kind, views_of=(lambda r: views[r]) if augment else None,
                            seed=seed)
        return fitted.transform(vectors[test_idx])

    def shots_row(name: str, kind: str, augment: bool, shots: int) -> None:
        # Which images are the shots moves mAP by about 0.02: average over draws.
        started = time.perf_counter()
        feats = [head(kind, augment, shots, seed) for seed in range(SEEDS)]
        seconds = (time.perf_counter() - started) / SEEDS
        scores = [exact_cosine_scores(f, test_labels, ks=(10,)) for f in feats]
        maps = [s.mean_ap for s in scores]
        lines.append(f"| {model_name} | {name}, {shots} shots per class (mean of {SEEDS} draws, "
                     f"mAP {min(maps):.3f}–{max(maps):.3f}) | {feats[0].shape[1]} | "
                     f"{np.mean(maps):.3f} | {np.mean([s.precision[10] for s in scores]):.3f} | "
                     f"{seconds:.1f} |")
        print(lines[-1], flush=True)

    row("raw pooled", lambda: vectors[test_idx])
    if not shots_only:
        for power in (1.0, 0.5):
            for shrink in (0.0, 0.5, 1.0):
                row(f"PCA-whitening 256, power {power}, shrinkage {shrink}",
                    lambda p=power, s=shrink: fit_pca_whitening(
                        vectors[train_idx], dim=256, shrinkage=s, power=p
                    ).transform(vectors[test_idx]))
    for kind, augment in (("linear", False), ("linear", True), ("cosine", False),
                          ("cosine", True)):
        name = f"{kind} head{' + aug' if augment else ''}"
        if not shots_only:
            row(f"{name}, all training images", lambda k=kind, a=augment: head(k, a))
        for shots in SHOTS:
            shots_row(name, kind, augment, shots)


if __name__ == "__main__":
    main()
