"""The steps of fine-tuning one backbone: the split, the shots, the features, the fit, the install.

`finetune` (service.py) runs them for one backbone, or for each of several joined ones.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.embedding import registry
from service.embedding.transforms import Preprocessing
from service.errors import ApiError
from service.evaluation.metrics import RetrievalScores
from service.evaluation.service import LabelledSet
from service.images.models import Image
from service.images.storage import ContentStore
from service.training.augment import VIEWS, embed_views
from service.training.cosine import fit_cosine_head
from service.training.heads import Head, fit_classifier
from service.training.maps import MapRunner, centre_maps
from service.training.tails import TOP, TOP_SCHEDULE, GraphTail

HEADS = ("cosine", "linear")
# progress(stage, done, total): finetune's long steps report through it (the CLI draws bars).
Progress = Callable[[str, int, int], None]
# Re-training the backbone's tail keeps every labelled image's feature maps in memory
# (about 20-70 KB each, float16, and five views of each training image): a bound on that.
MAX_TUNE_IMAGES = 10_000


@dataclass
class TrainingOutcome:
    """The installed model and what it scored on the held-out split."""

    model: str
    train_images: int
    test_images: int
    raw_test_map: float
    raw_test_p10: float
    head_test_map: float
    head_test_p10: float
    record: dict[str, Any]


def _side(value: str, test_share: int = 3) -> bool:
    """Deterministically put a split value on the test side (one in `test_share`)."""
    return int(hashlib.sha256(value.encode()).hexdigest(), 16) % test_share == 0


def split_values(*, session: Session, ids: list[Any], split_key: str | None) -> list[str]:
    """The value that decides each image's side: its split key, else its own id."""
    if split_key is None:
        return [str(i) for i in ids]
    rows = dict(session.execute(
        select(Image.id, Image.meta[split_key].astext).where(Image.id.in_(ids))).all())
    missing = [i for i in ids if rows.get(i) is None]
    if missing:
        raise ApiError("missing_split_key",
                       f"{len(missing)} images have no metadata key {split_key!r}")
    return [rows[i] for i in ids]


def next_head_name(model_dir: Path, base: str) -> str:
    """`<base>+head-N` with the next free N."""
    taken = [int(m.group(1)) for info in registry.installed(model_dir)
             if (m := re.fullmatch(re.escape(base) + r"\+head-(\d+)", info.name))]
    return f"{base}+head-{max(taken, default=0) + 1}"


def reporting(items: Iterable[bytes], stage: str, total: int,
              progress: Progress | None) -> Iterator[bytes]:
    """The items, reporting each one consumed as done in `stage`."""
    for done, item in enumerate(items, 1):
        yield item
        if progress is not None:
            progress(stage, done, total)


def stored_originals(*, session: Session, store: ContentStore, ids: list[Any], stage: str,
                     progress: Progress | None = None) -> Iterator[bytes]:
    """The stored original of each image, in the order of `ids`, reported as `stage`."""
    shas = dict(session.execute(select(Image.id, Image.sha256).where(Image.id.in_(ids))).all())
    return reporting((store.get(shas[i]) for i in ids), stage, len(ids), progress)


def augmented_rows(*, session: Session, ids: list[Any], store: ContentStore,
                   run: Callable[[np.ndarray], np.ndarray], prep: Preprocessing,
                   max_pixels: int, progress: Progress | None = None) -> np.ndarray:
    """What `run` keeps of each augmentation view of each image, shape (images, views, -1):
    pooled features, or feature maps flattened."""
    return embed_views(stored_originals(session=session, store=store, ids=ids,
                                        stage="augmentation views", progress=progress),
                       run, prep, max_pixels=max_pixels)


def pick_shots(labels: np.ndarray, train_idx: np.ndarray, classes: list[str], shots: int,
               seed: int = 0) -> np.ndarray:
    """`shots` random training rows of each class (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(train_idx[labels[train_idx] == c])[:shots]
                           for c in classes])


def train_head(vectors: np.ndarray, labels: np.ndarray, values: list[str],
               train_idx: np.ndarray, classes: list[str], *, validate: bool = True,
               head_kind: str = "cosine",
               views_of: Callable[[np.ndarray], np.ndarray] | None = None,
               hidden: int | None = None, epochs: int | None = None, seed: int = 0,
               tail: GraphTail | None = None,
               progress: Progress | None = None) -> Head:
    """Fit a labelled head on the training rows (what `finetune` and bench/training.py run).

    With `validate`, a validation split of other people (split values) is held out of the
    training side for early stopping and for picking the embedding's mix; `views_of` gives
    the augmentation views' features of the rows it is passed, added as extra training rows.
    With `tail` (the backbone's last layers), `vectors` and the views are the feature maps
    that feed it, and it is re-trained with a cosine head; the "top" tail sees one view of
    each image per epoch (TOP_SCHEDULE).
    """
    if head_kind not in HEADS:
        raise ApiError("bad_head", f"unknown head {head_kind!r}; choose from {HEADS}")
    if tail is not None and head_kind != "cosine":
        raise ApiError("bad_head", "only the cosine head re-trains the backbone's last layers")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(label, -1) for label in labels])  # -1: a class only in test
    val = np.array([_side(values[i] + "/val", 5) for i in train_idx])
    if validate and val.any() and (~val).sum() > len(classes):
        fit, held = train_idx[~val], train_idx[val]
    else:  # with few shots there are too few images to spare for validation
        fit, held = train_idx, train_idx[:0]
    x, fit_y = vectors[fit], y[fit]
    groups = np.arange(len(fit))  # the image of each row
    if views_of is not None:
        extra = views_of(fit)
        x = np.concatenate([x, extra.reshape((-1, *x.shape[1:]))])
        fit_y = np.concatenate([fit_y, np.repeat(y[fit], extra.shape[1])])
        groups = np.concatenate([groups, np.repeat(groups, extra.shape[1])])
    validation: dict[str, Any] = {} if not len(held) else {
        "val_x": vectors[held], "val_labels": labels[held].tolist()}
    if head_kind == "cosine":
        schedule: dict[str, Any] = cosine_schedule(len(fit), epochs, hidden)
        if tail is not None and tail.depth == TOP:
            schedule.update({**TOP_SCHEDULE, "epochs": epochs or TOP_SCHEDULE["epochs"],
                             "groups": groups})
        head = fit_cosine_head(x, fit_y, classes, seed=seed, tail=tail,
                               on_epoch=progress and partial(progress, "epochs"),
                               **schedule, **validation)
    else:
        head = fit_classifier(x, fit_y, classes, seed=seed, max_iter=300 if validation else 100,
                              **validation)
    head.record.update(augment=list(VIEWS) if views_of is not None else [],
                       fit_images=int(len(fit)), fit_rows=int(len(x)), val_images=int(len(held)))
    return head


def _install(model_dir: Path, model: onnx.ModelProto, base_info: registry.ModelInfo,
             changes: dict[str, Any], record: dict[str, Any], *, raw: RetrievalScores,
             tuned: RetrievalScores, train_idx: np.ndarray,
             test_idx: np.ndarray) -> TrainingOutcome:
    """Write the model, described as its base with `changes`, and its training record (to
    which the split's sizes and the test figures are added)."""
    record.update(train_images=int(len(train_idx)), test_images=int(len(test_idx)),
                  test_map_raw=raw.mean_ap, test_map=tuned.mean_ap,
                  test_p10=tuned.precision[10])
    info = registry.ModelInfo(**{**asdict(base_info), "version": "1", "sha256": "",
                                 **changes, "extra": {"training": record}})
    registry.write_model(model_dir, model, info)
    return TrainingOutcome(model=info.name, train_images=int(len(train_idx)),
                           test_images=int(len(test_idx)), raw_test_map=raw.mean_ap,
                           raw_test_p10=raw.precision[10], head_test_map=tuned.mean_ap,
                           head_test_p10=tuned.precision[10], record=record)


def _fit_branch(*, session: Session, backbone: onnx.ModelProto, info: registry.ModelInfo,
                prep: Preprocessing, data: LabelledSet, values: list[str],
                train_idx: np.ndarray, test_idx: np.ndarray, classes: list[str],
                validate: bool, head_kind: str, store: ContentStore | None, max_pixels: int,
                hidden: int | None, epochs: int | None, seed: int, tune: str,
                progress: Progress | None,
                embedder: Callable[[np.ndarray], np.ndarray] | None = None
                ) -> tuple[Head, np.ndarray]:
    """Fit a labelled head on one backbone (re-training its tail unless `tune` is "none");
    the head and the test rows' embeddings. With tune "none" the features are the stored
    vectors, and `embedder` gives the augmentation views' pooled features."""
    features, run, tail = data.vectors, embedder, None
    if tune != "none":
        if store is None or head_kind != "cosine":
            raise ApiError("bad_request", f"--tune {tune} needs the cosine head and the "
                           "stored originals (augmentation on)")
        if len(data.ids) > MAX_TUNE_IMAGES:
            raise ApiError("too_many_images", f"--tune {tune} keeps feature maps of at "
                           f"most {MAX_TUNE_IMAGES} labelled images in memory; this "
                           f"collection has {len(data.ids)}: use --tune none")
        runner = MapRunner(backbone, info.input_name, info.outputs[0], tune)
        tail, run = runner.tail, runner.run
        features = centre_maps(
            stored_originals(session=session, store=store, ids=data.ids,
                             stage="feature maps", progress=progress),
            runner, prep, max_pixels=max_pixels)

    def views_of(rows: np.ndarray) -> np.ndarray:
        assert store is not None and run is not None
        # Pooled features from the embedder, or the tail's input maps.
        return augmented_rows(session=session, ids=[data.ids[i] for i in rows],
                              store=store, run=run, prep=prep,
                              max_pixels=max_pixels, progress=progress)

    head = train_head(features, data.labels, values, train_idx, classes,
                      validate=validate, head_kind=head_kind,
                      views_of=views_of if store is not None else None, hidden=hidden,
                      epochs=epochs, seed=seed, tail=tail, progress=progress)
    test_features = (head.transform(data.vectors[test_idx]) if head.tail is None
                     else head.transform_maps(features[test_idx]))
    return head, test_features


def cosine_schedule(images: int, epochs: int | None = None,
                    hidden: int | None = None) -> dict[str, int]:
    """Size and schedule of the cosine head, by the number of labelled images fitted.

    Chosen on the validation split of the clothing set (docs/training.md): below 1000 images
    (few shots) a hidden layer overfits, and more, smaller steps help.
    """
    small = images < 1000
    return {"epochs": epochs or (20 if small else 10), "batch_size": 64 if small else 256,
            "hidden": (0 if small else 512) if hidden is None else hidden}
