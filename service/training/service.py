"""Fine-tune a retrieval head on a labelled collection and install it as a new model version.

The steps they share (split, shots, features, fit, install) are in fitting.py.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx
from sqlalchemy.orm import Session

from service.embedding import registry
from service.embedding.service import find_model
from service.embedding.session import get_embedder
from service.errors import ApiError
from service.evaluation.metrics import RetrievalScores, exact_cosine_scores
from service.evaluation.service import LabelledSet, load_labelled
from service.images.storage import ContentStore
from service.training.fitting import (
    HEADS,
    MAX_TUNE_IMAGES,
    Progress,
    TrainingOutcome,
    _fit_branch,
    _install,
    _side,
    cosine_schedule,
    next_head_name,
    pick_shots,
    split_values,
    train_head,
)
from service.training.heads import Head, fit_pca_whitening
from service.training.joined import join, resized_input
from service.training.onnx_head import append_head
from service.training.tails import DEPTHS, TOP

# What the CLI, the benches and the tests call, whichever module holds it.
__all__ = ["HEADS", "MAX_TUNE_IMAGES", "TUNES", "Progress", "TrainingOutcome", "_side",
           "cosine_schedule", "finetune", "next_head_name", "pick_shots", "split_values",
           "train_head"]
TUNES = ("none", *DEPTHS, TOP)


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


