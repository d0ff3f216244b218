"""Minimum spanning forest (Kruskal) and its cut at a distance threshold; pure Python."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TypeVar

Node = TypeVar("Node", bound=Hashable)


class DisjointSets:
    """Union-find with path halving and union by size."""

    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}
        self.size: dict[Hashable, int] = {}

    def find(self, x: Hashable) -> Hashable:
        """The representative of x's set (x joins as a singleton if new)."""
        if x not in self.parent:
            self.parent[x], self.size[x] = x, 1
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Hashable, b: Hashable) -> bool:
        """Merge the sets of a and b; False if they were already one."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True


def minimum_spanning_forest(edges: Iterable[tuple[Node, Node, float]]
                            ) -> list[tuple[Node, Node, float]]:
    """Kruskal's MST of each connected component; an undirected pair keeps its shortest edge."""
    # Sorted by (distance, endpoints) so equal distances resolve the same way on every run.
    ordered = sorted(((d, min(a, b, key=str), max(a, b, key=str)) for a, b, d in edges),
                     key=lambda e: (e[0], str(e[1]), str(e[2])))
    sets = DisjointSets()
    return [(a, b, d) for d, a, b in ordered if a != b and sets.union(a, b)]


def cut_clusters(nodes: Iterable[Node], edges: Iterable[tuple[Node, Node, float]],
                 threshold: float, min_size: int = 1) -> list[list[Node]]:
    """Clusters: the MST with every edge longer than `threshold` removed (single linkage).

    Largest first, members and ties in a stable order.
    """
    forest = minimum_spanning_forest(edges)
    sets = DisjointSets()
    for node in nodes:
        sets.find(node)
    for a, b, d in forest:
        if d <= threshold:
            sets.union(a, b)
    groups: dict[Hashable, list[Node]] = {}
    for node in list(sets.parent):
        groups.setdefault(sets.find(node), []).append(node)  # type: ignore[arg-type]
    out = [sorted(g, key=str) for g in groups.values() if len(g) >= min_size]
    return sorted(out, key=lambda g: (-len(g), str(g[0])))
