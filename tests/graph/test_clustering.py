"""Kruskal's minimum spanning forest and its threshold cut on hand-made graphs."""

from __future__ import annotations

from service.graph.clustering import cut_clusters, minimum_spanning_forest

# Two triangles joined by a long bridge, a pendant and an isolated node:
#   a-b 0.1, b-c 0.2, a-c 0.15 | d-e 0.05, e-f 0.3, d-f 0.4 | c-d 0.9 | f-g 0.6 | h alone
EDGES = [("a", "b", 0.1), ("b", "c", 0.2), ("a", "c", 0.15), ("d", "e", 0.05),
         ("e", "f", 0.3), ("d", "f", 0.4), ("c", "d", 0.9), ("f", "g", 0.6),
         ("b", "a", 0.5)]  # the reverse edge of a-b, longer: the pair keeps 0.1
NODES = list("abcdefgh")


def test_minimum_spanning_forest_is_kruskal() -> None:
    forest = minimum_spanning_forest(EDGES)
    assert sorted((min(a, b), max(a, b), d) for a, b, d in forest) == [
        ("a", "b", 0.1), ("a", "c", 0.15), ("c", "d", 0.9), ("d", "e", 0.05),
        ("e", "f", 0.3), ("f", "g", 0.6)]
    assert sum(d for *_, d in forest) == 0.1 + 0.15 + 0.9 + 0.05 + 0.3 + 0.6


def test_cut_at_thresholds_gives_the_known_clusters() -> None:
    assert cut_clusters(NODES, EDGES, 0.04) == [[n] for n in NODES]
    assert cut_clusters(NODES, EDGES, 0.12, min_size=2) == [["a", "b"], ["d", "e"]]
    # b-c (0.2) is not in the MST, but c joins through a-c (0.15).
    assert cut_clusters(NODES, EDGES, 0.3) == [["a", "b", "c"], ["d", "e", "f"], ["g"], ["h"]]
    assert cut_clusters(NODES, EDGES, 0.7) == [["d", "e", "f", "g"], ["a", "b", "c"], ["h"]]
    assert cut_clusters(NODES, EDGES, 1.0) == [list("abcdefg"), ["h"]]
