"""Distance metrics: their SQL expressions, index operator classes and scores.

Scores, larger is better:
- cosine: 1 - cosine distance (cosine similarity, in [-1, 1])
- inner_product: the inner product (pgvector's `<#>` returns its negative)
- l2, l1, chebyshev: 1 / (1 + distance), in (0, 1]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import ColumnElement, Float, cast, func, select
from sqlalchemy.dialects.postgresql import ARRAY, REAL

from service.errors import ApiError


def _chebyshev(vec: Any, query: Any) -> ColumnElement[float]:
    """max |a_i - b_i|, computed in SQL over the unnested arrays (no pgvector operator)."""
    as_array = cast(cast(query, HALFVEC()), ARRAY(REAL))
    pairs = func.unnest(cast(vec, ARRAY(REAL)), as_array).table_valued(
        "a", "b").render_derived()
    return select(func.max(func.abs(pairs.c.a - pairs.c.b))).scalar_subquery()


@dataclass(frozen=True)
class Metric:
    """A way to rank: SQL distance, index operator class (if pgvector has one), score."""

    name: str
    distance: Callable[[Any, Any], ColumnElement[float]]
    index_ops: str | None
    score: Callable[[float], float]


def _inverse(d: float) -> float:
    return 1.0 / (1.0 + d)


METRICS: dict[str, Metric] = {
    "cosine": Metric("cosine", lambda v, q: v.cosine_distance(q), "halfvec_cosine_ops",
                     lambda d: 1.0 - d),
    "l2": Metric("l2", lambda v, q: v.l2_distance(q), "halfvec_l2_ops", _inverse),
    "inner_product": Metric("inner_product", lambda v, q: v.max_inner_product(q),
                            "halfvec_ip_ops", lambda d: -d),
    "l1": Metric("l1", lambda v, q: v.l1_distance(q), None, _inverse),
    "chebyshev": Metric("chebyshev", lambda v, q: cast(_chebyshev(v, q), Float), None,
                        _inverse),
}


def get_metric(name: str) -> Metric:
    """The metric called `name`, or 400."""
    try:
        return METRICS[name]
    except KeyError as exc:
        raise ApiError("invalid_metric",
                       f"metric must be one of {', '.join(METRICS)}, not {name!r}") from exc
