"""Facets of a collection's metadata (values with counts, or ranges) and collection counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Float, Text, bindparam, cast, column, func, select, true
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Session

from service.images.models import Image

# An ISO-8601 date at the start of a string: such keys get a date range, not a value list.
ISO_DATE = r"^\d{4}-\d{2}-\d{2}"
# Values shown per key at most; a key with more distinct values gets a range (or nothing).
MAX_VALUES = 20
# Facets read at most this many of the newest rows, so a huge collection stays fast;
# the response says when it was a sample.
MAX_SCAN_ROWS = 100_000
SCALAR_TYPES = ("string", "number", "boolean")


@dataclass
class FacetValue:
    """One value of a key and how many images carry it."""

    value: Any
    count: int


@dataclass
class Facet:
    """One metadata key: its values with counts, or its range."""

    key: str
    type: str  # string, number, boolean or date
    count: int  # images that have the key with this type
    distinct: int
    values: list[FacetValue] = field(default_factory=list)
    min: Any = None
    max: Any = None


@dataclass
class Facets:
    """The facets of one collection (or of every collection)."""

    collection: str | None
    total: int
    scanned: int
    facets: list[Facet]

    @property
    def sampled(self) -> bool:
        """Whether only the newest rows were read."""
        return self.scanned < self.total


def collection_counts(*, session: Session) -> list[tuple[str, int]]:
    """Every collection's name and image count, by name."""
    query = (select(Image.collection, func.count())
             .group_by(Image.collection).order_by(Image.collection))
    return [(name, int(n)) for name, n in session.execute(query)]


def collection_facets(*, session: Session, collection: str | None,
                      max_values: int = MAX_VALUES, max_rows: int = MAX_SCAN_ROWS) -> Facets:
    """Facets of the metadata keys: values with counts for few values, ranges for many."""
    total_query = select(func.count()).select_from(Image)
    rows_query = select(Image.meta.label("meta"))
    if collection is not None:
        total_query = total_query.where(Image.collection == collection)
        rows_query = rows_query.where(Image.collection == collection)
    total = int(session.scalar(total_query) or 0)
    rows = (rows_query.order_by(Image.created_at.desc(), Image.id.desc())
            .limit(max_rows).subquery("rows"))
    scanned = int(session.scalar(select(func.count()).select_from(rows)) or 0)

    pairs = func.jsonb_each(rows.c.meta).table_valued("key", column("value", JSONB)).alias("kv")
    value = pairs.c.value
    kind = func.jsonb_typeof(value)
    # `#>> '{}'` is the scalar as text (a string without its quotes).
    as_text = value.op("#>>", return_type=Text)(bindparam("root", [], type_=ARRAY(Text)))
    stats = (
        select(pairs.c.key, kind.label("type"), func.count().label("n"),
               func.count(func.distinct(value)).label("distinct"),
               func.count().filter(as_text.regexp_match(ISO_DATE)).label("dates"))
        .select_from(rows).join(pairs, true())
        .where(kind.in_(SCALAR_TYPES))
        .group_by(pairs.c.key, kind)
    )
    # One type per key: the one most images use (ties by name, for a stable answer).
    best: dict[str, Facet] = {}
    for key, typ, n, distinct, dates in session.execute(stats):
        facet = Facet(key=key, type="date" if typ == "string" and dates == n else typ,
                      count=int(n), distinct=int(distinct))
        current = best.get(key)
        if current is None or (facet.count, current.type) > (current.count, facet.type):
            best[key] = facet
    facets = [best[k] for k in sorted(best)]

    # Numbers list their values only when values repeat (a code, a size); otherwise a range.
    few = [f for f in facets if f.distinct <= max_values and f.type != "date"
           and (f.type != "number" or 2 * f.distinct <= f.count)]
    if few:
        jtype = {f.key: f.type for f in few}
        counted = (
            select(pairs.c.key, value, func.count().label("n"))
            .select_from(rows).join(pairs, true())
            .where(pairs.c.key.in_(list(jtype)), kind.in_(SCALAR_TYPES))
            .group_by(pairs.c.key, value)
        )
        by_key = {f.key: f for f in few}
        for key, val, n in session.execute(counted):
            if _json_type(val) == jtype[key]:
                by_key[key].values.append(FacetValue(val, int(n)))
        for f in few:
            f.values.sort(key=lambda v: (-v.count, str(v.value)))

    for f in facets:
        if f.type == "number":
            lo, hi = session.execute(
                select(func.min(cast(value, Float)), func.max(cast(value, Float)))
                .select_from(rows).join(pairs, true())
                .where(pairs.c.key == f.key, kind == "number")).one()
            f.min, f.max = _number(lo), _number(hi)
        elif f.type == "date":
            lo, hi = session.execute(
                select(func.min(as_text), func.max(as_text))
                .select_from(rows).join(pairs, true())
                .where(pairs.c.key == f.key, kind == "string")).one()
            f.min, f.max = lo, hi
    return Facets(collection=collection, total=total, scanned=scanned, facets=facets)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "other"


def _number(value: float | None) -> float | int | None:
    """Whole numbers come back as ints, so a range of integers reads as integers."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else float(value)

