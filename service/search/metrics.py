"""Distance metrics: their SQL expressions, index operator classes and scores.

Scores, larger is better:
- cosine: 1 - cosine distance (cosine similarity, in [-1, 1])
- inner_product: the inner product (pgvector's `<#>` returns its negative)
- l2, l1, chebyshev, chi2, hamming: 1 / (1 + distance), in (0, 1]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import ColumnElement, Float, case, cast, func, select
from sqlalchemy.dialects.postgresql import ARRAY, BIT, REAL

from service.errors import ApiError


def _chebyshev(vec: Any, query: Any) -> ColumnElement[float]:
    """max |a_i - b_i|, computed in SQL over the unnested arrays (no pgvector operator)."""
    as_array = cast(cast(query, HALFVEC()), ARRAY(REAL))
    pairs = func.unnest(cast(vec, ARRAY(REAL)), as_array).table_valued(
        "a", "b").render_derived()
    return select(func.max(func.abs(pairs.c.a - pairs.c.b))).scalar_subquery()


def _chi_square(vec: Any, query: Any) -> ColumnElement[float]:
    """1/2 sum (a_i - b_i)^2 / (|a_i| + |b_i|), over the unnested arrays (histograms)."""
    as_array = cast(cast(query, HALFVEC()), ARRAY(REAL))
    pairs = func.unnest(cast(vec, ARRAY(REAL)), as_array).table_valued(
        "a", "b").render_derived()
    a, b = cast(pairs.c.a, Float), cast(pairs.c.b, Float)
    # |a| + |b| is a + b for histograms and keeps the terms non-negative for any vector.
    total = func.abs(a) + func.abs(b)
    term = case((total > 0, (a - b) * (a - b) / total), else_=0.0)
    return select(0.5 * func.coalesce(func.sum(term), 0.0)).scalar_subquery()


def _hamming(vec: Any, query: Any) -> ColumnElement[float]:
    """Bits that differ between the signs of two 0/1 vectors (pHash), as bit strings."""
    return func.binary_quantize(vec).op("<~>", return_type=Float)(
        func.binary_quantize(cast(query, HALFVEC())))


def _hamming_indexed(vec: Any, query: Any, dim: int) -> ColumnElement[float]:
    """The Hamming distance written as the model's bit(dim) HNSW index expression."""
    return cast(func.binary_quantize(cast(vec, HALFVEC(dim))), BIT(dim)).op(
        "<~>", return_type=Float)(cast(func.binary_quantize(cast(query, HALFVEC(dim))), BIT(dim)))


@dataclass(frozen=True)
class Metric:
    """A way to rank: SQL distance, index operator class (if pgvector has one), score."""

    name: str
    distance: Callable[[Any, Any], ColumnElement[float]]
    index_ops: str | None
    score: Callable[[float], float]
    # Without an index of its own, the metric re-ranks this index's candidates.
    candidates: str = "cosine"
    # The distance as the index expression, where that is not `vector::halfvec(dim)`.
    indexed: Callable[[Any, Any, int], ColumnElement[float]] | None = None


def _inverse(d: float) -> float:
    return 1.0 / (1.0 + d)


METRICS: dict[str, Metric] = {
    "cosine": Metric("cosine", lambda v, q: v.cosine_distance(q), "halfvec_cosine_ops",
                     lambda d: 1.0 - d),
    "l2": Metric("l2", lambda v, q: v.l2_distance(q), "halfvec_l2_ops", _inverse),
    "inner_product": Metric("inner_product", lambda v, q: v.max_inner_product(q),
                            "halfvec_ip_ops", lambda d: -d),
    "l1": Metric("l1", lambda v, q: v.l1_distance(q), "halfvec_l1_ops", _inverse),
    "chebyshev": Metric("chebyshev", lambda v, q: cast(_chebyshev(v, q), Float), None,
                        _inverse),
    # Histograms (hsv-hist) and perceptual hashes (phash), service/features.
    "chi2": Metric("chi2", lambda v, q: cast(_chi_square(v, q), Float), None, _inverse,
                   candidates="l1"),
    "hamming": Metric("hamming", _hamming, "bit_hamming_ops", _inverse,
                      indexed=_hamming_indexed),
}


def get_metric(name: str) -> Metric:
    """The metric called `name`, or 400."""
    try:
        return METRICS[name]
    except KeyError as exc:
        raise ApiError("invalid_metric",
                       f"metric must be one of {', '.join(METRICS)}, not {name!r}") from exc
