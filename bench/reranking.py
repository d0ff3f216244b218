"""mAP of plain cosine search, alpha query expansion and diffusion on the clothing set.

The service's own re-ranking math (`service.graph.reranking`) on the 3,308 EfficientNet-Lite0
clothing embeddings: every photo queries all others; relevant = same label. Diffusion runs on
the exact 10-NN graph (what `lookalike.rebuild_graph` stores); images it does not reach keep
their cosine order after the ones it does.

    python -m bench.reranking [--queries 3308]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.harness import append_results, clothing_embeddings


def average_precision(order: np.ndarray, relevant: np.ndarray) -> float:
    """AP of a full ranking (indices) against a boolean relevance vector."""
    hits = relevant[order]
    if not hits.any():
        return 0.0
    ranks = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def main() -> None:
    """Run the comparison and append it to docs/benchmarks.md."""
    from service.graph.reranking import (
        AQE_ALPHA,
        AQE_NEIGHBOURS,
        DIFFUSION_ALPHA,
        DIFFUSION_GAMMA,
        DIFFUSION_SEEDS,
        diffusion_scores,
        expanded_order,
    )

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=3308)
    parser.add_argument("--k", type=int, default=10, help="graph out-degree")
    args = parser.parse_args()
    vectors, rows = clothing_embeddings()
    labels = np.array([r["label"] for r in rows])
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    n = len(x)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    knn = np.argsort(-sims, axis=1, kind="stable")[:, :args.k]
    src = np.repeat(np.arange(n), args.k)
    dst = knn.ravel()
    edge_sim = sims[src, dst]
    queries = np.linspace(0, n - 1, min(args.queries, n)).astype(int)
    aps: dict[str, list[float]] = {"plain": [], "aqe": [], "diffusion": []}
    ms: dict[str, list[float]] = {k: [] for k in aps}
    for qi in queries:
        relevant = labels == labels[qi]
        relevant[qi] = False
        t0 = time.perf_counter()
        order = np.argsort(-sims[qi], kind="stable")[:-1]  # the query itself sorts last
        ms["plain"].append((time.perf_counter() - t0) * 1000)
        aps["plain"].append(average_precision(order, relevant))

        t0 = time.perf_counter()
        aqe_order = expanded_order(x, qi, order)
        ms["aqe"].append((time.perf_counter() - t0) * 1000)
        aps["aqe"].append(average_precision(aqe_order, relevant))

        t0 = time.perf_counter()
        seeds = order[:DIFFUSION_SEEDS]
        f = diffusion_scores(n, src, dst, edge_sim, seeds,
                             np.clip(sims[qi, seeds], 0, None) ** DIFFUSION_GAMMA)
        f[qi] = -np.inf
        # Reached images by diffusion mass, the rest by cosine after them.
        diff_order = np.lexsort((-sims[qi], -np.where(f > 0, f, 0)))
        diff_order = diff_order[diff_order != qi]
        ms["diffusion"].append((time.perf_counter() - t0) * 1000)
        aps["diffusion"].append(average_precision(diff_order, relevant))
    base = float(np.mean(aps["plain"]))
    lines = ["| method | mAP | gain over plain | p50 ms (numpy, 1 query) |", "|---|---:|---:|---:|"]
    for name, values in aps.items():
        m = float(np.mean(values))
        lines.append(f"| {name} | {m:.4f} | {m - base:+.4f} ({(m / base - 1) * 100:+.1f}%) | "
                     f"{np.median(ms[name]):.2f} |")
    append_results(
        f"Re-ranking on the clothing set ({n} photos, {len(queries)} queries, relevant = "
        "same label)",
        f"aqe: alpha {AQE_ALPHA}, {AQE_NEIGHBOURS} neighbours; diffusion: exact {args.k}-NN "
        f"graph, {DIFFUSION_SEEDS} seeds, alpha {DIFFUSION_ALPHA}, gamma {DIFFUSION_GAMMA}, "
        "20 conjugate-gradient steps.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
