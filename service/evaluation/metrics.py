"""Retrieval metrics over rankings (pure numpy).

AP of a query: the mean, over its relevant items, of the precision at each relevant item's
rank, over the full ranking of every other item (the query itself excluded). mAP: the mean AP
over queries (macro). P@k: relevant items among the first k, over k. R@k: over all relevant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RetrievalScores:
    """mAP and precision/recall at each k, averaged over queries."""

    mean_ap: float
    precision: dict[int, float] = field(default_factory=dict)
    recall: dict[int, float] = field(default_factory=dict)
    queries: int = 0


def average_precision(relevant: np.ndarray) -> float:
    """AP of one ranking given as a boolean array of relevance, best first."""
    hits = np.flatnonzero(relevant)
    if hits.size == 0:
        return 0.0
    precision_at_hits = np.arange(1, hits.size + 1) / (hits + 1)
    return float(precision_at_hits.mean())


class RankingAccumulator:
    """Scores rankings one at a time, keeping per-query figures only (not the rankings)."""

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10, 100)) -> None:
        self.ks = ks
        self.aps: list[float] = []
        self.precision: dict[int, list[float]] = {k: [] for k in ks}
        self.recall: dict[int, list[float]] = {k: [] for k in ks}

    def add(self, relevant: np.ndarray, total: int | None = None) -> float | None:
        """Score one ranking; its AP, or None when the query has no relevant item."""
        rel = np.asarray(relevant, dtype=bool)
        total = int(rel.sum()) if total is None else total
        if total == 0:
            return None
        hits = np.flatnonzero(rel)
        ap = float((np.arange(1, hits.size + 1) / (hits + 1)).sum() / total)
        self.aps.append(ap)
        for k in self.ks:
            found = int(rel[:k].sum())
            self.precision[k].append(found / k)
            self.recall[k].append(found / total)
        return ap

    def scores(self) -> RetrievalScores:
        """Means over the queries added so far."""
        return RetrievalScores(
            mean_ap=float(np.mean(self.aps)) if self.aps else 0.0,
            precision={k: float(np.mean(v)) for k, v in self.precision.items() if v},
            recall={k: float(np.mean(v)) for k, v in self.recall.items() if v},
            queries=len(self.aps),
        )


def evaluate_rankings(rankings: list[np.ndarray], ks: tuple[int, ...] = (1, 5, 10, 100),
                      totals: list[int] | None = None) -> RetrievalScores:
    """Scores from boolean relevance arrays (full rankings, query excluded)."""
    scores = RankingAccumulator(ks)
    for i, rel in enumerate(rankings):
        scores.add(rel, totals[i] if totals is not None else None)
    return scores.scores()


def exact_cosine_scores(vectors: np.ndarray, labels: list[str],
                        ks: tuple[int, ...] = (1, 5, 10, 100),
                        queries: np.ndarray | None = None) -> RetrievalScores:
    """Every image (or the given query rows) against all others by exact cosine similarity."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    label_arr = np.asarray(labels)
    rows = np.arange(len(vectors)) if queries is None else np.asarray(queries)
    rankings = []
    for start in range(0, len(rows), 256):
        block = rows[start:start + 256]
        sims = unit[block] @ unit.T
        sims[np.arange(len(block)), block] = -np.inf  # the query itself is not a result
        order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]
        for qi, ranked in zip(block, order, strict=True):
            rankings.append(label_arr[ranked] == label_arr[qi])
    return evaluate_rankings(rankings, ks)
