"""Evaluate retrieval on a labelled collection: the service's search path against brute force."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from service.embedding.models import EmbeddingModel, ImageEmbedding
from service.errors import ApiError
from service.evaluation.metrics import RankingAccumulator, RetrievalScores
from service.graph.reranking import AQE_NEIGHBOURS, expanded_order
from service.images.models import Image
from service.search.rerank import rerank_hits
from service.search.types import SearchResult
from service.search.vectors import search_vectors

# Re-rankings an evaluation can apply: each must order the whole collection, which rules
# out diffusion (it ranks only the images its walk reaches).
RERANKINGS = ("aqe",)


@dataclass
class LabelledSet:
    """The ready images of a collection that carry a label, with their vectors."""

    ids: list[uuid.UUID]
    labels: np.ndarray
    vectors: np.ndarray


@dataclass
class QueryOutcome:
    """One query's AP through the search path, and its top results."""

    image_id: str
    label: str
    ap: float
    top: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Evaluation:
    """mAP/P@k/R@k through the search path and by brute force, plus details for a report."""

    collection: str
    model: str
    label_key: str
    images: int
    classes: int
    service: RetrievalScores
    exact: RetrievalScores
    per_class_ap: dict[str, float]
    pr_curve: list[tuple[float, float]]
    worst: list[QueryOutcome]
    rerank: str | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        def scores(s: RetrievalScores) -> dict[str, Any]:
            return {"map": s.mean_ap, "precision": s.precision, "recall": s.recall,
                    "queries": s.queries}
        return {
            "collection": self.collection, "model": self.model, "label_key": self.label_key,
            "rerank": self.rerank, "images": self.images, "classes": self.classes,
            "service": scores(self.service),
            "exact": scores(self.exact), "map_gap": self.exact.mean_ap - self.service.mean_ap,
            "per_class_ap": self.per_class_ap, "pr_curve": self.pr_curve,
            "worst": [q.__dict__ for q in self.worst],
        }


def load_labelled(*, session: Session, collection: str, label_key: str,
                  model: EmbeddingModel) -> LabelledSet:
    """Ids, labels and vectors of the collection's labelled, embedded images."""
    rows = session.execute(
        select(Image.id, Image.meta[label_key].astext, ImageEmbedding.vector)
        .join(ImageEmbedding, ImageEmbedding.image_id == Image.id)
        .where(*_labelled(collection, label_key, model)).order_by(Image.id)
    ).all()
    labels = np.asarray([r[1] for r in rows])
    _require_classes(len(rows), len(set(labels.tolist())), collection, label_key)
    vectors = np.asarray([np.asarray(r[2], dtype=np.float32) for r in rows])
    return LabelledSet(ids=[r[0] for r in rows], labels=labels, vectors=vectors)


def check_labelled(*, session: Session, collection: str, label_key: str,
                   model: EmbeddingModel) -> None:
    """Raise the errors that `load_labelled` would, from two counts (no vectors read)."""
    images, classes = session.execute(
        select(func.count(), func.count(distinct(Image.meta[label_key].astext)))
        .select_from(Image).join(ImageEmbedding, ImageEmbedding.image_id == Image.id)
        .where(*_labelled(collection, label_key, model))
    ).one()
    _require_classes(images, classes, collection, label_key)


def _labelled(collection: str, label_key: str, model: EmbeddingModel) -> tuple[Any, ...]:
    return (Image.collection == collection, Image.status == "ready",
            ImageEmbedding.model_id == model.id, Image.meta.has_key(label_key))


def _require_classes(images: int, classes: int, collection: str, label_key: str) -> None:
    if not images:
        raise ApiError("no_labelled_images",
                       f"no ready images in {collection!r} carry the metadata key {label_key!r}")
    if classes < 2:
        raise ApiError("one_class", f"{label_key!r} has a single value in {collection!r}: "
                       "evaluation needs at least two classes")


LEVELS = np.linspace(0, 1, 11)  # recall levels of the precision-recall curve


def _interpolated_precision(rel: np.ndarray, total: int) -> list[float]:
    """One query's best precision at any recall at least each of LEVELS."""
    hits = np.cumsum(rel)
    precision = hits / np.arange(1, len(rel) + 1)
    recall = hits / max(total, 1)
    best = np.maximum.accumulate(precision[::-1])[::-1]  # interpolated: best to the right
    return [float(best[recall >= r][0]) if np.any(recall >= r) else 0.0 for r in LEVELS]


def evaluate_collection(*, session: Session, collection: str, label_key: str,
                        model: EmbeddingModel, ks: tuple[int, ...] = (1, 5, 10, 100),
                        sample: int | None = None, seed: int = 0, worst: int = 8,
                        method: str | None = None, rerank: str | None = None) -> Evaluation:
    """Each (sampled) image queries the rest through search_vectors and by brute force.

    With `rerank="aqe"`, both sides expand each query as search's `rerank: "aqe"` does:
    the search path through the same function, brute force from exact neighbours.
    """
    if rerank is not None and rerank not in RERANKINGS:
        raise ApiError("invalid_request", f"evaluation re-ranks by {RERANKINGS}, not {rerank!r}")
    data = load_labelled(session=session, collection=collection, label_key=label_key,
                         model=model)
    n = len(data.ids)
    rng = np.random.default_rng(seed)
    queries = np.arange(n) if not sample or sample >= n else np.sort(
        rng.choice(n, sample, replace=False))
    index_of = {image_id: i for i, image_id in enumerate(data.ids)}
    unit = data.vectors / np.maximum(np.linalg.norm(data.vectors, axis=1, keepdims=True), 1e-12)
    # Per-query figures only: a full ranking per query would grow with queries × images.
    service, exact = RankingAccumulator(ks), RankingAccumulator(ks)
    curves, outcomes, per_class = [], [], {}
    for qi in queries:
        label = str(data.labels[qi])
        total = int((data.labels == data.labels[qi]).sum()) - 1

        def ranked(vector: np.ndarray, k: int, qi: int = int(qi)) -> SearchResult:
            return search_vectors(vector, session=session, model=model, k=k,
                                  collection=collection, exclude_id=data.ids[qi],
                                  force_method=method, ids_only=True)

        if rerank is None:
            result = ranked(data.vectors[qi], n - 1)
        else:
            result = rerank_hits(rerank, data.vectors[qi],
                                 ranked(data.vectors[qi], AQE_NEIGHBOURS), session=session,
                                 model=model, search=ranked, k=n - 1, collection=collection,
                                 exclude_id=data.ids[qi])
        got = [index_of[h.image.id] for h in result.hits if h.image.id in index_of]
        relevant = data.labels[got] == data.labels[qi]
        ap = service.add(relevant, total)
        curves.append(_interpolated_precision(relevant, total))
        sims = unit @ unit[qi]
        sims[qi] = -np.inf
        order = np.argsort(-sims, kind="stable")[:-1]
        if rerank is not None:
            order = expanded_order(unit, int(qi), order)
        exact_ap = exact.add(data.labels[order] == data.labels[qi], total)
        per_class.setdefault(label, []).append(exact_ap or 0.0)
        outcomes.append(QueryOutcome(
            image_id=str(data.ids[qi]), label=label, ap=ap or 0.0,
            top=[{"id": str(data.ids[j]), "label": str(data.labels[j])} for j in got[:8]]))
        outcomes = sorted(outcomes, key=lambda o: o.ap)[:worst]
    mean_curve = np.mean(curves, axis=0) if curves else np.zeros(len(LEVELS))
    return Evaluation(
        collection=collection, model=model.name, label_key=label_key, images=n,
        classes=len(set(data.labels.tolist())), service=service.scores(),
        exact=exact.scores(),
        per_class_ap={k: float(np.mean(v)) for k, v in sorted(per_class.items())},
        pr_curve=[(float(r), float(p)) for r, p in zip(LEVELS, mean_curve, strict=True)],
        worst=outcomes, rerank=rerank,
    )


def create_run(params: dict[str, Any], *, session: Session) -> Any:
    """Validate the parameters cheaply and record a queued evaluation."""
    from service.embedding.service import find_model
    from service.evaluation.models import EvaluationRun

    model = find_model(params["model"], session=session)
    if model is None:
        raise ApiError("unknown_model",
                       f"no images have been embedded with model {params['model']!r}")
    # A collection that cannot be evaluated is refused now, not queued to fail later.
    check_labelled(session=session, collection=params["collection"],
                   label_key=params["label_key"], model=model)
    run = EvaluationRun(params=params, status="queued")
    session.add(run)
    session.commit()
    return run


def execute_run(run_id: uuid.UUID, *, session: Session) -> str:
    """Run a queued evaluation (idempotent: a finished run is left as it is)."""
    from datetime import UTC, datetime

    from service.embedding.service import find_model
    from service.evaluation.models import EvaluationRun

    run = session.get(EvaluationRun, run_id)
    if run is None or run.status in ("done", "failed"):
        return "gone" if run is None else run.status
    run.status = "running"
    session.commit()
    p = run.params
    try:
        model = find_model(p["model"], session=session)
        if model is None:
            raise ApiError("unknown_model", f"model {p['model']!r} is gone")
        result = evaluate_collection(session=session, collection=p["collection"],
                                     label_key=p["label_key"], model=model,
                                     ks=tuple(p["ks"]), sample=p.get("sample"),
                                     method=p.get("method"), rerank=p.get("rerank"))
        run.result, run.status = result.summary(), "done"
    except ApiError as exc:
        session.rollback()
        run = session.get(EvaluationRun, run_id)
        run.status, run.error = "failed", exc.message
    run.finished_at = datetime.now(UTC)
    session.commit()
    return run.status
