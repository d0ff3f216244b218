"""The strategies by name: adding a way of searching is one module and one line here."""

from __future__ import annotations

from service.search.strategies import codes, compact, crops, exact, hnsw, hybrid, text
from service.search.types import Strategy

STRATEGIES: dict[str, Strategy] = {
    "exact": exact.search,
    "hnsw": hnsw.search,
    "compact-graph": compact.graph,
    "compact-scan": compact.scan,
    "codes": codes.search,
    "crops": crops.search,
    "text": text.search,
    "hybrid": hybrid.search,
}
