"""Fine-tune a retrieval head on a labelled collection and install it as a new model version."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.embedding import registry
from service.embedding.service import find_model
from service.errors import ApiError
from service.evaluation.metrics import exact_cosine_scores
from service.evaluation.service import load_labelled
from service.images.models import Image
from service.training.heads import Head, fit_classifier, fit_pca_whitening
from service.training.onnx_head import append_head


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


def finetune(*, session: Session, collection: str, label_key: str, base: str,
             model_dir: Path, split_key: str | None = None, shots: int | None = None,
             unsupervised: bool = False, dim: int = 256, seed: int = 0,
             name: str | None = None) -> TrainingOutcome:
    """Fit a head on the train split's stored vectors, score it on the test split, install it."""
    model_row = find_model(base, session=session)
    if model_row is None:
        raise ApiError("unknown_model", f"no images have been embedded with model {base!r}")
    data = load_labelled(session=session, collection=collection, label_key=label_key,
                         model=model_row)
    values = split_values(session=session, ids=data.ids, split_key=split_key)
    test = np.array([_side(v) for v in values])
    if test.all() or not test.any():
        raise ApiError("bad_split", "the split put every image on one side")
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    rng = np.random.default_rng(seed)
    classes = sorted(set(data.labels[train_idx].tolist()))
    if len(classes) < 2:
        raise ApiError("one_class", "the training split has a single class")
    if shots:
        train_idx = np.concatenate([
            rng.permutation(train_idx[data.labels[train_idx] == c])[:shots] for c in classes])
    test_labels = data.labels[test_idx].tolist()
    raw = exact_cosine_scores(data.vectors[test_idx], test_labels, ks=(10,))

    head: Head
    if unsupervised:
        head = fit_pca_whitening(data.vectors[train_idx], dim=dim)
    else:
        y = np.array([classes.index(label) for label in data.labels[train_idx]])
        # Early stopping needs held-out images; with few shots there are too few to spare.
        # Validation images come from other people (split values) than the fitted ones.
        val = np.array([_side(values[i] + "/val", 5) for i in train_idx]) if not shots else None
        if val is not None and val.any() and (~val).sum() > len(classes):
            fit, held = train_idx[~val], train_idx[val]
            head = fit_classifier(data.vectors[fit], y[~val], classes, seed=seed,
                                  val_x=data.vectors[held],
                                  val_labels=data.labels[held].tolist())
        else:
            head = fit_classifier(data.vectors[train_idx], y, classes, seed=seed,
                                  max_iter=100)
    tuned = exact_cosine_scores(head.transform(data.vectors[test_idx]), test_labels, ks=(10,))

    base_info = registry.verify(model_dir, base)
    backbone = onnx.load_model(registry.model_path(model_dir, base) / "model.onnx")
    model = append_head(backbone, head)
    record = {
        "base": base, "collection": collection, "label_key": label_key,
        "split_key": split_key, "shots": shots, "head": head.kind, **head.record,
        "train_images": int(len(train_idx)), "test_images": int(len(test_idx)),
        "test_map_raw": raw.mean_ap, "test_map": tuned.mean_ap,
        "test_p10": tuned.precision[10],
    }
    info = registry.ModelInfo(**{**asdict(base_info), "name": name or next_head_name(
        model_dir, base), "version": "1", "dim": int(head.weight.shape[1]), "sha256": "",
        "source": f"{base} + {head.kind} head fitted on {collection!r}",
        "extra": {"training": record}})
    registry.write_model(model_dir, model, info)
    return TrainingOutcome(model=info.name, train_images=int(len(train_idx)),
                           test_images=int(len(test_idx)), raw_test_map=raw.mean_ap,
                           raw_test_p10=raw.precision[10], head_test_map=tuned.mean_ap,
                           head_test_p10=tuned.precision[10], record=record)
