"""Filtered vector search at N vectors: recall, completeness, latency and QPS, against peers.

Vectors resemble real embeddings: real EfficientNet-Lite0 features of the shared clothing
photos, moved along the data's own principal directions (not isotropic noise). Metadata keys
select 100%, 10%, 1%, 0.1% and 0.01% of the rows, and two independent 10% keys ANDed about
1%. The service's own path prepares compact vectors (fit, fill, index) and answers through
search_vectors and over HTTP. Peers in the same run: numpy exact search, faiss-cpu
IndexHNSWFlat (post-filter and id selector), and with --compare-full the full-vector HNSW
route of the service before its compact vectors are ready.

    python -m bench.search --n 100000 [--queries 500] [--http] [--compare-full]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import append_results, bench_services, clothing_embeddings, percentiles
from bench.search_data import (
    assign_metadata,
    build_index,
    load,
    prepare_compact,
    settings,
    synthesize,
)

FILTERS: dict[str, dict[str, Any]] = {
    "all": {"all": True}, "f10": {"f10": True}, "f1": {"f1": True}, "f10&g10":
    {"f10": True, "g10": True}, "f01": {"f01": True}, "f001": {"f001": True},
}
KS = (10, 100)


def rows_of(members: dict[str, np.ndarray], doc: dict[str, Any]) -> np.ndarray:
    """Row numbers that a filter of FILTERS keeps."""
    mask = np.ones(len(next(iter(members.values()))), dtype=bool)
    for key in doc:
        mask &= members[key]
    return np.flatnonzero(mask)


def exact_topk(unit: np.ndarray, query: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact cosine top-k among `rows`."""
    q = query / np.linalg.norm(query)
    scores = unit[rows] @ q
    top = np.argsort(-scores, kind="stable")[:k]
    return rows[top]


def truths_for(unit: np.ndarray, queries: np.ndarray, members: dict[str, np.ndarray],
               wanted: list[str]) -> dict[str, tuple[np.ndarray, list[np.ndarray], float]]:
    """Per filter: its rows, the exact top-max(KS) of each query, numpy's p50 ms."""
    out = {}
    for key in wanted:
        rows = rows_of(members, FILTERS[key])
        tops, ms = [], []
        for query in queries:
            t0 = time.perf_counter()
            tops.append(exact_topk(unit, query, rows, max(KS)))
            ms.append((time.perf_counter() - t0) * 1000)
        out[key] = (rows, tops, percentiles(ms)[0])
    return out


def measure(app: Any, model_id: int, queries: np.ndarray,
            truths: dict[str, tuple[np.ndarray, list[np.ndarray], float]],
            id_index: dict[Any, int], label: str) -> list[dict[str, Any]]:
    """Recall, completeness and latency of search_vectors per filter and k."""
    from service.db import session_scope
    from service.embedding.models import EmbeddingModel
    from service.search import estimates
    from service.search.vectors import search_vectors

    estimates.clear()
    out = []
    for key, (rows, tops, numpy_p50) in truths.items():
        doc = FILTERS[key]
        for k in KS:
            recalls, full, sql_ms, methods, touched = [], 0, [], {}, []
            with app.app_context():
                for qi, query in enumerate(queries):
                    with session_scope() as session:
                        model = session.get(EmbeddingModel, model_id)
                        t0 = time.perf_counter()
                        result = search_vectors(query, session=session, model=model, k=k,
                                                filter_doc=doc)
                        elapsed = (time.perf_counter() - t0) * 1000
                        if qi < 3:  # how many rows the path read, from EXPLAIN ANALYZE
                            touched.append(search_vectors(
                                query, session=session, model=model, k=k, filter_doc=doc,
                                explain=True).plan.rows_scanned or 0)
                    if qi >= min(5, len(queries) // 2):  # the first few warm the caches
                        sql_ms.append(elapsed)
                    got = [id_index[h.image.id] for h in result.hits]
                    want = min(k, len(rows))
                    recalls.append(len(set(got) & set(tops[qi][:k].tolist())) / want)
                    full += int(len(got) == want)
                    method = result.plan.method + (" (hot)" if any(
                        "partial index" in n for n in result.plan.notes) else "")
                    methods[method] = methods.get(method, 0) + 1
            p50, p95, p99 = percentiles(sql_ms)
            out.append({"label": label, "key": key, "k": k, "matches": len(rows),
                        "recall": float(np.mean(recalls)), "full": full / len(queries),
                        "p50": p50, "p95": p95, "p99": p99, "methods": methods,
                        "touched": int(np.mean(touched)), "numpy_p50": numpy_p50})
            print(out[-1], flush=True)
    return out


def build_hot(url: str) -> list[tuple[str, float]]:
    """Build the hot-filter indexes the searches asked for, as the index-build task would."""
    import psycopg

    from service.db import make_engine
    from service.embedding import indexes

    with psycopg.connect(url) as conn:
        pending = conn.execute("SELECT id, name FROM index_builds WHERE status = 'pending' "
                               "ORDER BY id").fetchall()
    engine = make_engine(url)
    built = []
    for build_id, name in pending:
        t0 = time.perf_counter()
        indexes.build(int(build_id), engine=engine, memory="2GB")
        built.append((str(name), time.perf_counter() - t0))
    engine.dispose()
    return built


def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    base, _ = clothing_embeddings()
    vectors = synthesize(base, args.n, rng)
    queries = synthesize(base, args.queries, rng)
    members = assign_metadata(args.n, rng)
    wanted = [k for k in FILTERS if not args.only or k in args.only.split(",")]
    with bench_services("search", shared_buffers=args.shared_buffers) as urls:
        url = urls["DATABASE_URL"]
        started = time.perf_counter()
        model_id, ids = load(url, vectors, members, compact=not args.compare_full)
        load_s = time.perf_counter() - started
        # Normalise in place once loaded: at 1M rows a second copy would not fit beside the
        # index build's memory.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = vectors
        from service.app import create_app

        app = create_app({"DATABASE_URL": url, "REDIS_URL": urls["REDIS_URL"]})
        id_index = {image_id: i for i, image_id in enumerate(ids)}
        rows_out: list[dict[str, Any]] = []
        truths = truths_for(unit, queries, members, wanted)
        full_build = None
        if args.compare_full:
            full_build = build_index(url, model_id, vectors.shape[1], args.maintenance_work_mem)
            rows_out += measure(app, model_id, queries, truths, id_index,
                                "full-vector HNSW (before compact)")
        timings = prepare_compact(url, model_id, args.maintenance_work_mem)
        print("compact:", timings, flush=True)
        # The first searches of each filter: before any of them has its partial index.
        rows_out += measure(app, model_id, queries, truths, id_index, "before hot indexes")
        timings["hot"] = build_hot(url)
        print("hot-filter indexes:", timings["hot"], flush=True)
        rows_out += measure(app, model_id, queries, truths, id_index, "service")
        http = {}
        if args.http:
            server = start_api(urls, args.port)
            try:
                for key in wanted:
                    http[key] = http_latency(queries, FILTERS[key], args)
                    print(key, http[key], flush=True)
            finally:
                server.terminate()
                server.wait(timeout=30)
        faiss_rows = faiss_peer(unit, queries, {k: rows_of(members, FILTERS[k]) for k in wanted}
                                ) if args.faiss else {}
        report(args, rows_out, http, faiss_rows, vectors.shape[1], load_s, timings,
               full_build, settings(url))


def start_api(urls: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """gunicorn with the service's app against the bench database, as `make run` starts it."""
    from service.services.ports import wait_for_port

    # Loopback: keys are not required, as under `make run`.
    env = dict(os.environ, **urls, LOOKALIKE_BIND_HOST="127.0.0.1")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "service.wsgi:app",
                             "-b", f"127.0.0.1:{port}", "-w", "2", "--threads", "4"], env=env)
    wait_for_port(port, timeout=60)
    return proc


def http_latency(queries: np.ndarray, doc: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, float]:
    """Whole-request latency through gunicorn, then QPS with 2 concurrent clients."""
    import requests

    base = f"http://127.0.0.1:{args.port}"
    bodies = [{"vector": q.tolist(), "k": 10, "filter": doc, "model": "bench"} for q in queries]
    session = requests.Session()
    times = []
    for i, body in enumerate(bodies):
        t0 = time.perf_counter()
        resp = session.post(f"{base}/api/v1/search", json=body, timeout=30)
        resp.raise_for_status()
        if i >= 5:
            times.append((time.perf_counter() - t0) * 1000)
    done = [0, 0]
    stop = time.perf_counter() + args.qps_seconds

    def client(slot: int) -> None:
        s = requests.Session()
        i = slot
        while time.perf_counter() < stop:
            s.post(f"{base}/api/v1/search", json=bodies[i % len(bodies)],
                   timeout=30).raise_for_status()
            done[slot] += 1
            i += 2

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p50, p95, p99 = percentiles(times)
    return {"p50": p50, "p95": p95, "p99": p99, "qps": sum(done) / args.qps_seconds}


def faiss_peer(vectors: np.ndarray, queries: np.ndarray,
               members: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """faiss IndexHNSWFlat on the same unit vectors: post-filter and id-selector recall/latency.

    `members` maps each filter to the row numbers it keeps.
    """
    import faiss

    unit = vectors  # already unit length
    index = faiss.IndexHNSWFlat(unit.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 64
    started = time.perf_counter()
    index.add(unit)
    print(f"faiss HNSW built in {time.perf_counter() - started:.0f}s")
    index.hnsw.efSearch = 100
    qs = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    out = {}
    for key, rows in members.items():
        mask = np.zeros(len(unit), dtype=bool)
        mask[rows] = True
        truths = [set(exact_topk(unit, q, rows, 10).tolist()) for q in qs]
        want = min(10, len(rows))
        post_ms, post_recall, sel_ms, sel_recall = [], [], [], []
        selector = faiss.IDSelectorBatch(rows.astype(np.int64))
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=100)
        for q, truth in zip(qs, truths, strict=True):
            t0 = time.perf_counter()
            _, found = index.search(q[None, :], 100)
            hits = [i for i in found[0] if i >= 0 and mask[i]][:10]
            post_ms.append((time.perf_counter() - t0) * 1000)
            post_recall.append(len(set(hits) & truth) / want)
            t0 = time.perf_counter()
            _, found = index.search(q[None, :], 10, params=params)
            sel_ms.append((time.perf_counter() - t0) * 1000)
            sel_recall.append(len({i for i in found[0] if i >= 0} & truth) / want)
        out[key] = {"post_recall": float(np.mean(post_recall)),
                    "post_p99": percentiles(post_ms)[2],
                    "sel_recall": float(np.mean(sel_recall)), "sel_p99": percentiles(sel_ms)[2]}
    return out


def report(args: argparse.Namespace, rows: list[dict[str, Any]], http: dict[str, Any],
           faiss_rows: dict[str, Any], dim: int, load_s: float, timings: dict[str, Any],
           full_build: tuple[float, int] | None, pg: dict[str, str]) -> None:
    sizes = {k: v / 2**20 for k, v in timings["sizes"].items()}
    build = timings["fit_s"] + timings["fill_s"] + timings["index_s"]
    lines = [
        f"N = {args.n:,} vectors × {dim} (halfvec), {args.queries} queries, k = {KS}. "
        f"Load (COPY) {load_s:.0f} s. Compact vectors (the service's prepare): fit "
        f"{timings['fit_s']:.0f} s, fill {timings['fill_s']:.0f} s "
        f"({timings['filled']} vectors), HNSW index "
        f"{timings['index_s']:.0f} s: {build:.0f} s in all. Sizes MiB: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sizes.items())
        + (f". Full-vector HNSW build (the comparison) {full_build[0]:.0f} s, "
           f"{full_build[1] / 2**20:.0f} MiB" if full_build else "")
        + ". Hot-filter indexes built after the first pass (s): "
        + (", ".join(f"{name.rsplit('_', 1)[-1]} {secs:.0f}" for name, secs in timings["hot"])
           or "none")
        + ". PostgreSQL: " + ", ".join(f"{k}={v}" for k, v in sorted(pg.items())) + ".",
        "",
        "| path | filter | matches | k | route | recall | full rows | rows read | "
        "SQL p50 / p95 / p99 ms | HTTP p50 / p99 ms | QPS (2 clients) | numpy exact p50 ms | "
        "faiss HNSW post-filter recall / p99 ms | faiss id-selector recall / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h = http.get(r["key"]) if r["label"] == "service" and r["k"] == 10 else None
        f = faiss_rows.get(r["key"]) if r["label"] == "service" and r["k"] == 10 else None
        lines.append(
            f"| {r['label']} | {r['key']} | {r['matches']} | {r['k']} | "
            + ", ".join(f"{m} {c}" for m, c in r["methods"].items())
            + f" | {r['recall']:.3f} | {r['full']:.0%} | {r['touched']} | {r['p50']:.1f} / "
            f"{r['p95']:.1f} / {r['p99']:.1f} | "
            + (f"{h['p50']:.1f} / {h['p99']:.1f} | {h['qps']:.0f} | " if h else "– | – | ")
            + f"{r['numpy_p50']:.1f} | "
            + (f"{f['post_recall']:.3f} / {f['post_p99']:.2f} | "
               f"{f['sel_recall']:.3f} / {f['sel_p99']:.2f} |" if f else "– | – |"))
    append_results(f"Filtered search, N = {args.n:,}", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--shared-buffers", default="2GB")
    parser.add_argument("--maintenance-work-mem", default="2GB",
                        help="for the index builds (session setting)")
    parser.add_argument("--http", action="store_true", help="also time HTTP requests")
    parser.add_argument("--compare-full", action="store_true",
                        help="first measure the full-vector HNSW route, same data")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--qps-seconds", type=float, default=10)
    parser.add_argument("--no-faiss", dest="faiss", action="store_false")
    parser.add_argument("--only", default="", help="comma-separated filters: " + ",".join(FILTERS))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
