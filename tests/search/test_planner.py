"""The routing decision on its own: strategy by estimated selectivity, and the graph width."""

from __future__ import annotations

import pytest

from service.search.planner import (
    COMPACT_SCAN_MAX_ROWS,
    EF_SEARCH,
    EXACT_MAX_ROWS,
    MAX_EF_SEARCH,
    Route,
    ef_search_for,
    route,
)


def test_an_unfiltered_query_walks_the_graph_however_few_rows() -> None:
    chosen = route(k=10, filtered=False, estimated_rows=0.0, selectivity=1.0)
    assert chosen == Route(strategy="hnsw", ef_search=EF_SEARCH, exact_fallback=True)


@pytest.mark.parametrize("rows,strategy", [
    (1.0, "exact"), (EXACT_MAX_ROWS, "exact"), (EXACT_MAX_ROWS + 1, "hnsw"), (1e6, "hnsw"),
])
def test_a_filter_expected_to_match_few_rows_is_ranked_exactly(rows: float,
                                                                strategy: str) -> None:
    chosen = route(k=10, filtered=True, estimated_rows=rows, selectivity=0.5)
    assert chosen.strategy == strategy and chosen.exact_fallback


def test_the_exact_threshold_is_the_callers() -> None:
    assert route(k=5, filtered=True, estimated_rows=50, selectivity=0.1,
                 exact_max_rows=49).strategy == "hnsw"
    assert route(k=5, filtered=True, estimated_rows=50, selectivity=0.1,
                 exact_max_rows=50).strategy == "exact"


@pytest.mark.parametrize("forced,strategy", [("exact", "exact"), ("index", "hnsw")])
def test_a_forced_method_wins_and_never_falls_back(forced: str, strategy: str) -> None:
    for filtered, rows in ((False, 0.0), (True, 1.0), (True, 1e6)):
        chosen = route(k=10, filtered=filtered, estimated_rows=rows, selectivity=0.01,
                       force_method=forced)
        assert chosen.strategy == strategy and not chosen.exact_fallback
    with pytest.raises(ValueError, match="hnsw"):
        route(k=10, filtered=False, estimated_rows=0, selectivity=1.0, force_method="hnsw")


@pytest.mark.parametrize("k,selectivity,ef", [
    (10, 1.0, EF_SEARCH),          # the floor
    (300, 1.0, 300),               # at least k
    (10, 0.1, 150),                # about 15 qualifying candidates a step
    (10, 0.05, 300),
    (10, 0.001, MAX_EF_SEARCH),    # capped
    (10, 0.0, MAX_EF_SEARCH),      # no rows expected: capped, not a division by zero
    (5000, 1.0, MAX_EF_SEARCH),
])
def test_the_graph_is_widened_as_the_filter_narrows(k: int, selectivity: float,
                                                    ef: int) -> None:
    assert ef_search_for(k, selectivity) == ef
    assert route(k=k, filtered=True, estimated_rows=1e6, selectivity=selectivity).ef_search == ef


def test_a_cursor_keeps_the_width_of_its_first_page() -> None:
    chosen = route(k=10, filtered=True, estimated_rows=1e6, selectivity=0.01, cursor_ef=123)
    assert chosen.ef_search == 123


@pytest.mark.parametrize("filtered,rows,strategy", [
    (False, 5.0, "compact-graph"), (True, 1.0, "compact-scan"),
    (True, COMPACT_SCAN_MAX_ROWS, "compact-scan"),
    (True, COMPACT_SCAN_MAX_ROWS + 1, "compact-graph"), (True, 1e6, "compact-graph"),
])
def test_compact_vectors_are_scanned_for_small_filters_and_walked_for_large_ones(
        filtered: bool, rows: float, strategy: str) -> None:
    chosen = route(k=10, filtered=filtered, estimated_rows=rows, selectivity=0.01, compact=True)
    assert chosen.strategy == strategy and chosen.exact_fallback


@pytest.mark.parametrize("rows,selectivity,strategy", [
    (5_000, 1.0, "compact-graph"), (5_000, 0.1, "compact-scan"), (10_000, 0.1, "compact-scan"),
    (15_000, 0.1, "compact-graph"), (10_000, 0.01, "compact-scan"),
])
def test_a_filter_that_keeps_most_rows_walks_even_when_small(rows: float, selectivity: float,
                                                              strategy: str) -> None:
    chosen = route(k=10, filtered=True, estimated_rows=rows, selectivity=selectivity,
                   compact=True)
    assert chosen.strategy == strategy


def test_with_compact_vectors_a_forced_index_walks_the_compact_graph() -> None:
    assert route(k=10, filtered=True, estimated_rows=1.0, selectivity=0.1, compact=True,
                 force_method="index").strategy == "compact-graph"
    assert route(k=10, filtered=False, estimated_rows=0.0, selectivity=1.0, compact=True,
                 force_method="scan").strategy == "compact-scan"
    with pytest.raises(ValueError):
        route(k=10, filtered=False, estimated_rows=0.0, selectivity=1.0, force_method="scan")
