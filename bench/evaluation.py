"""`lookalike eval` on the clothing set: its search path selecting ids only, against whole rows.

The 3,308 clothing photos' cached vectors and labels go into a throwaway PostgreSQL (COPY, HNSW
built as the service builds it). Each sampled query ranks the whole collection (k = n - 1)
through `search_vectors` twice, interleaved: with `ids_only` (what evaluation runs) and with
whole image rows (what the API runs), as ms per query and their ratio; the rankings must be
the same. Then `evaluate_collection` on the same sample, with its figures.

    python -m bench.evaluation [--model efficientnet-lite2] [--queries 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.harness import append_results, bench_services, clothing_embeddings, percentiles
from bench.search_data import build_index, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite2",
                        help="whose cached clothing vectors to load (var/bench)")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    vectors, rows = clothing_embeddings(args.model)
    labels = [{"label": r["label"]} for r in rows]
    with bench_services("evaluation") as urls:
        model_id, ids = load(urls["DATABASE_URL"], vectors, {}, metadata=labels)
        build_index(urls["DATABASE_URL"], model_id, vectors.shape[1])

        from service.app import create_app
        from service.db import session_scope
        from service.embedding.models import EmbeddingModel
        from service.evaluation.service import evaluate_collection
        from service.search.vectors import search_vectors

        app = create_app({"DATABASE_URL": urls["DATABASE_URL"], "REDIS_URL": urls["REDIS_URL"]})
        rng = np.random.default_rng(0)
        sample = rng.choice(len(ids), args.queries, replace=False)
        times: dict[bool, list[float]] = {True: [], False: []}
        with app.app_context(), session_scope() as session:
            model = session.get(EmbeddingModel, model_id)
            assert model is not None
            methods = set()
            for qi in sample:
                ranked = {}
                for ids_only in (True, False):
                    started = time.perf_counter()
                    result = search_vectors(vectors[qi], session=session, model=model,
                                            k=len(ids) - 1, collection="bench",
                                            exclude_id=ids[qi], ids_only=ids_only)
                    times[ids_only].append((time.perf_counter() - started) * 1000)
                    ranked[ids_only] = [h.image.id for h in result.hits]
                    methods.add(result.plan.method)
                    # As each API request's fresh session: no rows from the identity map.
                    session.expunge_all()
                    model = session.merge(model, load=False)
                if ranked[True] != ranked[False]:
                    raise AssertionError(f"query {qi}: the two selections ranked differently")
            started = time.perf_counter()
            evaluation = evaluate_collection(session=session, collection="bench",
                                             label_key="label", model=model, ks=(1, 10),
                                             sample=args.queries)
            eval_s = time.perf_counter() - started

    ids_p50, _, ids_p99 = percentiles(times[True])
    rows_p50, _, rows_p99 = percentiles(times[False])
    lines = [
        f"{len(ids)} clothing photos ({args.model} vectors), {args.queries} sampled queries, "
        f"each ranking the whole collection (k = {len(ids) - 1}) by the planned method "
        f"({', '.join(sorted(methods))}); both selections interleaved per query, identical "
        "rankings.", "",
        "| selection | p50 ms/query | p99 ms/query |", "|---|---|---|",
        f"| ids only (evaluation) | {ids_p50:.0f} | {ids_p99:.0f} |",
        f"| whole image rows (API) | {rows_p50:.0f} | {rows_p99:.0f} |", "",
        f"Whole rows / ids only at p50: {rows_p50 / ids_p50:.2f}x.",
        f"`evaluate_collection` on the same {args.queries} queries: {eval_s:.1f} s "
        f"({eval_s * 1000 / args.queries:.0f} ms per query with the vectors' load); mAP "
        f"{evaluation.service.mean_ap:.4f} through SQL, {evaluation.exact.mean_ap:.4f} exact, "
        f"P@10 {evaluation.service.precision[10]:.4f}.",
    ]
    append_results("Evaluation's search path: ids only against whole rows", "\n".join(lines))


if __name__ == "__main__":
    main()
