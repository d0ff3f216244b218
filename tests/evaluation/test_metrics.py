"""Retrieval metrics against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from service.evaluation.metrics import (
    RankingAccumulator,
    average_precision,
    evaluate_rankings,
    exact_cosine_scores,
)


def test_average_precision_by_hand() -> None:
    # Relevant at ranks 1, 3 and 6: (1/1 + 2/3 + 3/6) / 3.
    assert average_precision(np.array([1, 0, 1, 0, 0, 1], bool)) == pytest.approx(
        (1 + 2 / 3 + 0.5) / 3)
    assert average_precision(np.zeros(4, bool)) == 0.0


def test_precision_recall_and_map() -> None:
    scores = evaluate_rankings([np.array([1, 0, 1, 0], bool), np.array([0, 1, 0, 0], bool)],
                               ks=(1, 2))
    assert scores.precision == {1: 0.5, 2: 0.5}
    assert scores.recall == {1: 0.25, 2: 0.75}
    assert scores.mean_ap == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def test_accumulated_one_at_a_time_with_missed_relevant_items() -> None:
    scores = RankingAccumulator(ks=(1, 2))
    # Three relevant in all, the ranking (a search's k results) found two of them.
    assert scores.add(np.array([1, 0, 1], bool), total=3) == pytest.approx((1 + 2 / 3) / 3)
    assert scores.add(np.array([0, 0, 0], bool), total=0) is None  # no relevant: not counted
    assert scores.add(np.array([0, 1, 0], bool)) == pytest.approx(0.5)
    result = scores.scores()
    assert result.queries == 2 and result.precision == {1: 0.5, 2: 0.5}
    assert result.recall == {1: pytest.approx(1 / 6), 2: pytest.approx((1 / 3 + 1) / 2)}
    assert result.mean_ap == pytest.approx(((1 + 2 / 3) / 3 + 0.5) / 2)


def test_exact_cosine_excludes_the_query() -> None:
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    scores = exact_cosine_scores(vectors, ["a", "a", "b", "b"], ks=(1,))
    assert scores.mean_ap == 1.0 and scores.precision[1] == 1.0
    swapped = exact_cosine_scores(vectors, ["a", "b", "a", "b"], ks=(1,))
    assert swapped.precision[1] == 0.0
