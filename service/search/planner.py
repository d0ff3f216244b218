"""The routing decision of a vector query: exact scan or HNSW walk, and how wide to walk.

A filtered HNSW search in pgvector can return too few rows, and PostgreSQL's planner may drop
the index. So each query is routed here, from the planner's row estimate for its filter: an
exact scan over the filtered rows for small sets, an iterative HNSW scan for large ones (which
is re-run exactly when it comes back short). Once a model has compact vectors
(service/embedding/projection.py), a filter estimated up to COMPACT_SCAN_MAX_ROWS scans the
compact vectors and the rest walk the compact graph; both re-rank a pool on the full vectors,
so a filter that leaves no more rows than the pool is ranked exactly. A pure function of
numbers, tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

# Filters the planner expects to match at most this many rows are ranked exactly: scanning
# them costs less than walking the graph past all the rows the filter rejects. Measured at
# 100k x 1280 (docs/benchmarks.md): exact costs ~4 us a row, 38 ms at 10,000 rows.
EXACT_MAX_ROWS = 3_000
# With compact vectors: a scan of them up to this many rows, the compact graph above. An exact
# scan of 1,000 full vectors (read out of line) took 12.5 ms where the compact scan of the
# same rows took 4.4 (100k x 1280, docs/benchmarks.md).
COMPACT_SCAN_MAX_ROWS = 20_000
# A tuple the compact walk reads costs about this many scanned rows (100k x 1280, a 10% filter:
# 15 ms for the ~1,000 tuples a 100-row pool needs, 13.7 ms to scan its 10,000 rows): the scan
# wins only when the filter leaves fewer rows than the walk would read.
WALK_COST = 10
COMPACT_POOL = 100
# The graph is explored this wide at least (more for k above it). A fixed width makes the
# strict-order scan one deterministic stream, so later pages continue the first one exactly.
EF_SEARCH = 100
MAX_EF_SEARCH = 1000
# Under a filter only a share of each graph step's candidates qualify, so the walk is widened
# until about this many qualifying candidates come with each step.
QUALIFYING_PER_STEP = 15
# Methods a caller may force (evaluation, benches): the names the explain record uses.
FORCED = {"exact": "exact", "index": "hnsw"}
COMPACT_FORCED = {"exact": "exact", "index": "compact-graph", "scan": "compact-scan"}


@dataclass(frozen=True)
class Route:
    """Which strategy ranks a vector query, the graph width, and whether a short walk falls back."""

    strategy: str
    ef_search: int
    exact_fallback: bool


def ef_search_for(k: int, selectivity: float) -> int:
    """The graph width for k results when a share `selectivity` of the rows qualifies."""
    widened = round(QUALIFYING_PER_STEP / max(selectivity, 1e-3))
    return min(MAX_EF_SEARCH, max(EF_SEARCH, k, widened))


def route(*, k: int, filtered: bool, estimated_rows: float, selectivity: float,
          exact_max_rows: int = EXACT_MAX_ROWS, force_method: str | None = None,
          cursor_ef: int | None = None, compact: bool = False,
          compact_pool: int = COMPACT_POOL) -> Route:
    """Exact for a filter expected to match few rows, else a graph walk; a cursor keeps its width.

    With `compact` (the model's compact vectors are ready), mid-sized filtered sets are
    scanned on the compact vectors and large ones walk the compact graph.
    """
    forced = COMPACT_FORCED if compact else FORCED
    if force_method is not None:
        if force_method not in forced:
            raise ValueError(f"force_method is one of {', '.join(forced)}, not {force_method!r}")
        strategy = forced[force_method]
    elif compact:
        walked = WALK_COST * compact_pool / max(selectivity, 1e-6)
        scan = filtered and estimated_rows <= min(COMPACT_SCAN_MAX_ROWS, walked)
        strategy = "compact-scan" if scan else "compact-graph"
    else:
        strategy = "exact" if filtered and estimated_rows <= exact_max_rows else "hnsw"
    ef = cursor_ef if cursor_ef is not None else ef_search_for(k, selectivity)
    return Route(strategy=strategy, ef_search=ef, exact_fallback=force_method is None)
