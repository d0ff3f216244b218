"""Fine-tune a retrieval head on a labelled collection and install it as a new model version.

Over 300 lines: the single and joined-backbone paths share the split, shots and install
steps; kept together until training computes every gradient one way.
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
from service.embedding.service import find_model
from service.embedding.session import get_embedder
from service.embedding.transforms import Preprocessing
from service.errors import ApiError
from service.evaluation.metrics import RetrievalScores, exact_cosine_scores
from service.evaluation.service import LabelledSet, load_labelled
from service.images.models import Image
from service.images.storage import ContentStore
from service.training.augment import VIEWS, embed_views
from service.training.cosine import fit_cosine_head
from service.training.heads import Head, fit_classifier, fit_pca_whitening
from service.training.joined import join, resized_input
from service.training.maps import MapRunner, centre_maps
from service.training.onnx_head import append_head
from service.training.tails import DEPTHS, TOP, TOP_SCHEDULE, GraphTail

HEADS = ("cosine", "linear")
# progress(stage, done, total): finetune's long steps report through it (the CLI draws bars).
Progress = Callable[[str, int, int], None]
TUNES = ("none", *DEPTHS, TOP)
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


def finetune(*, session: Session, collection: str, label_key: str, base: str,
             model_dir: Path, split_key: str | None = None, shots: int | None = None,
             unsupervised: bool = False, dim: int = 256, seed: int = 0,
             name: str | None = None, head_kind: str = "cosine",
             store: ContentStore | None = None, max_pixels: int = 64_000_000,
             hidden: int | None = None, epochs: int | None = None,
             tune: str | None = "none", progress: Progress | None = None) -> TrainingOutcome:
    """Fit a head on the train split's stored vectors, score it on the test split, install it.

    With a content `store`, the training images' augmentation views (mirrored, wider and
    tighter crops) are embedded by the backbone and added as extra training rows. `tune`
    ("last-conv", "last-block" or "top": the blocks from the last downsampling on; needs the
    store) re-trains the backbone's last layers with the head, from the feature maps that
    feed them (docs/training.md); None: "last-conv"
    when it can (a store, the cosine head, at most MAX_TUNE_IMAGES labelled images), else
    "none". `progress` hears about the feature maps, the augmentation views and the epochs.
    `base` may name several backbones, comma-separated: a head on each, joined into one
    model (_finetune_joined).
    """
    if tune is not None and tune not in TUNES:
        raise ApiError("bad_request", f"unknown --tune {tune!r}; choose from {TUNES}")
    for option, value, least in (("shots", shots, 1), ("dim", dim, 1), ("epochs", epochs, 1),
                                 ("hidden", hidden, 0)):
        if value is not None and value < least:
            raise ApiError("bad_request", f"--{option} must be at least {least}, not {value}")
    bases = [b.strip() for b in base.split(",") if b.strip()]
    if len(bases) > 1:
        _check_joinable(bases, unsupervised=unsupervised, head_kind=head_kind, store=store,
                        tune=tune)
    # Several backbones: the first one's stored vectors give the images and the raw figures.
    model_row = find_model(bases[0], session=session)
    if model_row is None:
        raise ApiError("unknown_model",
                       f"no images have been embedded with model {bases[0]!r}")
    data = load_labelled(session=session, collection=collection, label_key=label_key,
                         model=model_row)
    values = split_values(session=session, ids=data.ids, split_key=split_key)
    test = np.array([_side(v) for v in values])
    if test.all() or not test.any():
        raise ApiError("bad_split", "the split put every image on one side")
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    classes = sorted(set(data.labels[train_idx].tolist()))
    if len(classes) < 2:
        raise ApiError("one_class", "the training split has a single class")
    if shots:
        train_idx = pick_shots(data.labels, train_idx, classes, shots, seed)
    test_labels = data.labels[test_idx].tolist()
    raw = exact_cosine_scores(data.vectors[test_idx], test_labels, ks=(10,))

    if len(bases) > 1:
        return _finetune_joined(
            session=session, collection=collection, label_key=label_key, bases=bases,
            model_dir=model_dir, split_key=split_key, shots=shots, seed=seed, name=name,
            store=store, max_pixels=max_pixels, hidden=hidden, epochs=epochs,
            tune=tune or "last-conv", progress=progress, data=data, values=values,
            train_idx=train_idx, test_idx=test_idx, classes=classes, raw=raw)
    base = bases[0]
    base_info = registry.verify(model_dir, base)
    backbone = onnx.load_model(registry.model_path(model_dir, base) / "model.onnx")
    head: Head
    if unsupervised:
        head = fit_pca_whitening(data.vectors[train_idx], dim=dim)
        test_features = head.transform(data.vectors[test_idx])
    else:
        if tune is None:
            tune = "last-conv" if (store is not None and head_kind == "cosine"
                                    and len(data.ids) <= MAX_TUNE_IMAGES) else "none"
        head, test_features = _fit_branch(
            session=session, backbone=backbone, info=base_info, prep=base_info.preprocessing,
            data=data, values=values, train_idx=train_idx, test_idx=test_idx,
            classes=classes, validate=not shots, head_kind=head_kind, store=store,
            max_pixels=max_pixels, hidden=hidden, epochs=epochs, seed=seed, tune=tune,
            progress=progress, embedder=lambda b: get_embedder(model_dir, base).run(b).vectors)
    tuned = exact_cosine_scores(test_features, test_labels, ks=(10,))
    model = append_head(backbone, head)
    record = {
        "base": base, "collection": collection, "label_key": label_key,
        "split_key": split_key, "shots": shots, "head": head.kind, **head.record,
    }
    return _install(model_dir, model, base_info, {
        "name": name or next_head_name(model_dir, base), "dim": head.dim,
        "source": f"{base} + {head.kind} head fitted on {collection!r}"},
        record, raw=raw, tuned=tuned, train_idx=train_idx, test_idx=test_idx)


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


def _branch_progress(progress: Progress, branch: str, stage: str, done: int,
                     total: int) -> None:
    progress(f"{branch}: {stage}", done, total)


def _check_joinable(bases: list[str], *, unsupervised: bool, head_kind: str,
                    store: ContentStore | None, tune: str | None) -> None:
    """Refuse what a model of several backbones cannot be, before any work."""
    if unsupervised or head_kind != "cosine" or store is None or tune == "none":
        raise ApiError("bad_request", "several backbones (--from a,b) re-train each one's "
                       "last layers: they need the cosine head, augmentation and a --tune "
                       "other than none")
    if len(set(bases)) != len(bases):
        raise ApiError("bad_request", f"--from names a backbone twice: {','.join(bases)}")


def _finetune_joined(*, session: Session, collection: str, label_key: str, bases: list[str],
                     model_dir: Path, split_key: str | None, shots: int | None, seed: int,
                     name: str | None, store: ContentStore | None,
                     max_pixels: int, hidden: int | None, epochs: int | None,
                     tune: str, progress: Progress | None, data: LabelledSet,
                     values: list[str], train_idx: np.ndarray, test_idx: np.ndarray,
                     classes: list[str],
                     raw: RetrievalScores) -> TrainingOutcome:
    """A head per backbone, each re-training its backbone's tail on the same images, joined
    into one model whose embedding is theirs side by side (docs/training.md)."""
    infos = [registry.verify(model_dir, b) for b in bases]
    if any((i.mean, i.std) != (infos[0].mean, infos[0].std) for i in infos):
        raise ApiError("bad_request", "the backbones normalise their input differently")
    # The largest input is the model's: the others see it resized inside the graph.
    primary = max(range(len(infos)), key=lambda i: infos[i].input_size)
    prep = infos[primary].preprocessing
    heads, branches, parts = [], [], []
    for b, info in zip(bases, infos, strict=True):
        backbone = resized_input(
            onnx.load_model(registry.model_path(model_dir, b) / "model.onnx"),
            info.input_name, prep.size, info.input_size)
        head, test_features = _fit_branch(
            session=session, backbone=backbone, info=info, prep=prep, data=data,
            values=values, train_idx=train_idx, test_idx=test_idx, classes=classes,
            validate=not shots, head_kind="cosine", store=store, max_pixels=max_pixels,
            hidden=hidden, epochs=epochs, seed=seed, tune=tune,
            progress=progress and partial(_branch_progress, progress, b))
        heads.append(head)
        branches.append(append_head(backbone, head))
        parts.append(test_features / np.maximum(
            np.linalg.norm(test_features, axis=1, keepdims=True), 1e-12))
    test_labels = data.labels[test_idx].tolist()
    tuned = exact_cosine_scores(np.concatenate(parts, axis=1), test_labels, ks=(10,))
    kept = infos[primary].outputs[1:2]
    model = join(branches, infos[0].input_name,
                 keep=(primary, kept[0]) if kept else None)
    joined = "+".join(bases)
    record = {
        "base": joined, "bases": bases, "collection": collection, "label_key": label_key,
        "split_key": split_key, "shots": shots, "seed": seed, "head": heads[0].kind,
        "branches": [{"base": b, "dim": h.dim, **h.record}
                     for b, h in zip(bases, heads, strict=True)],
    }
    return _install(model_dir, model, infos[primary], {
        "name": name or next_head_name(model_dir, joined), "dim": sum(h.dim for h in heads),
        "outputs": ["embedding", *kept], "input_name": infos[0].input_name,
        "licence": ", ".join(sorted({i.licence for i in infos})),
        "source": f"{' + '.join(bases)}, each with a {heads[0].kind} head fitted on "
                  f"{collection!r}, embeddings joined"},
        record, raw=raw, tuned=tuned, train_idx=train_idx, test_idx=test_idx)


def cosine_schedule(images: int, epochs: int | None = None,
                    hidden: int | None = None) -> dict[str, int]:
    """Size and schedule of the cosine head, by the number of labelled images fitted.

    Chosen on the validation split of the clothing set (docs/training.md): below 1000 images
    (few shots) a hidden layer overfits, and more, smaller steps help.
    """
    small = images < 1000
    return {"epochs": epochs or (20 if small else 10), "batch_size": 64 if small else 256,
            "hidden": (0 if small else 512) if hidden is None else hidden}
