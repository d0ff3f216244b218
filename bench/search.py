"""Filtered vector search at N vectors: recall, completeness, latency and QPS, against peers.

Vectors resemble real embeddings: real EfficientNet-Lite0 features of the shared clothing
photos, moved along the data's own principal directions (not isotropic noise). Metadata keys
select 100%, 10%, 1%, 0.1% and 0.01% of the rows. Peers in the same run: numpy exact search
and faiss-cpu IndexHNSWFlat (post-filter and id selector).

    python -m bench.search --n 100000 [--queries 200] [--http]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector

from bench.harness import append_results, bench_services, clothing_embeddings, percentiles

SELECTIVITIES = {"all": 1.0, "f10": 0.1, "f1": 0.01, "f01": 0.001, "f001": 0.0001}
K = 10


def synthesize(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n vectors around real ones, displaced along the principal components of the real set."""
    mean = base.mean(axis=0)
    centred = base - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    scale = (s / np.sqrt(len(base)))[:256]
    components = vt[: len(scale)].astype(np.float32)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 50_000):  # in chunks: at 1M rows the temporaries are gigabytes
        m = min(50_000, n - start)
        picks = rng.integers(0, len(base), m)
        coeffs = rng.normal(size=(m, len(scale))).astype(np.float32) * scale * 0.6
        chunk = base[picks] * 0.5 + (mean + coeffs @ components) * 0.5
        out[start:start + m] = np.maximum(chunk, 0).astype(np.float16)
    return out


def assign_metadata(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Boolean membership per selectivity key, each an exact share of the rows."""
    members = {}
    for key, share in SELECTIVITIES.items():
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, max(1, round(n * share)), replace=False)] = True
        members[key] = mask
    return members


def load(url: str, vectors: np.ndarray, members: dict[str, np.ndarray],
         metadata: list[dict[str, Any]] | None = None) -> tuple[int, list]:
    """COPY images and vectors in; returns the model id and the image ids.

    Each image's metadata is {key: true} for the `members` masks it is in, or `metadata[i]`.
    """
    ids = [uuid.uuid4() for _ in range(len(vectors))]
    with psycopg.connect(url) as conn:
        register_vector(conn)
        model_id = conn.execute(
            "INSERT INTO models (name, version, dim, sha256) VALUES ('bench', '1', %s, %s) "
            "RETURNING id", (vectors.shape[1], "0" * 64)).fetchone()[0]
        with conn.cursor().copy(
                "COPY images (id, collection, sha256, mime, format, width, height, bytes, "
                "metadata, status) FROM STDIN") as copy:
            for i, image_id in enumerate(ids):
                meta = metadata[i] if metadata is not None else {
                    key: True for key, mask in members.items() if mask[i]}
                copy.write_row((image_id, "bench", f"{i:064x}", "image/jpeg", "JPEG", 1, 1, 1,
                                json.dumps(meta), "ready"))
        with conn.cursor().copy("COPY image_embeddings (image_id, model_id, vector) FROM STDIN "
                                "WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid", "int4", "halfvec"])
            for i, image_id in enumerate(ids):
                copy.write_row((image_id, model_id, HalfVector(vectors[i])))
        conn.commit()
    return model_id, ids


def build_index(url: str, model_id: int, dim: int,
                maintenance_work_mem: str = "2GB") -> tuple[float, int]:
    """Create the model's HNSW index as the service does; returns seconds and bytes."""
    from service.embedding.service import index_name

    with psycopg.connect(url, autocommit=True) as conn:
        # The build is several times faster while the graph fits in maintenance_work_mem.
        conn.execute(f"SET maintenance_work_mem = '{maintenance_work_mem}'")
        started = time.perf_counter()
        conn.execute(f"CREATE INDEX {index_name(model_id, 'cosine')} ON image_embeddings "
                     f"USING hnsw ((vector::halfvec({dim})) halfvec_cosine_ops) "
                     f"WITH (m = 16, ef_construction = 64) WHERE model_id = {int(model_id)}")
        seconds = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE images")
        conn.execute("VACUUM ANALYZE image_embeddings")
        # Measure the steady state of a serving database, not the first reads from disk.
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        for relation in (index_name(model_id, "cosine"), "image_embeddings", "images"):
            conn.execute("SELECT pg_prewarm(%s)", (relation,))
        size = conn.execute("SELECT pg_relation_size(%s)",
                            (index_name(model_id, "cosine"),)).fetchone()[0]
        settings = dict(conn.execute(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
            "('shared_buffers', 'maintenance_work_mem', 'work_mem', "
            "'max_parallel_maintenance_workers', 'max_parallel_workers_per_gather', "
            "'effective_cache_size')").fetchall())
    print("settings:", settings)
    build_index.settings = settings  # type: ignore[attr-defined]
    return seconds, size


def exact_topk(unit: np.ndarray, query: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact cosine top-k among `rows`."""
    q = query / np.linalg.norm(query)
    scores = unit[rows] @ q
    top = np.argsort(-scores, kind="stable")[:k]
    return rows[top]


def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    base, _ = clothing_embeddings()
    vectors = synthesize(base, args.n, rng)
    queries = synthesize(base, args.queries, rng)
    members = assign_metadata(args.n, rng)
    dim = vectors.shape[1]
    with bench_services("search", shared_buffers=args.shared_buffers) as urls:
        started = time.perf_counter()
        model_id, ids = load(urls["DATABASE_URL"], vectors, members)
        load_s = time.perf_counter() - started
        # Normalise in place once loaded: at 1M rows a second copy would not fit with the
        # index build's memory.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = vectors
        build_s, index_bytes = build_index(urls["DATABASE_URL"], model_id, dim,
                                           args.maintenance_work_mem)
        print(f"loaded {args.n} in {load_s:.0f}s; index built in {build_s:.0f}s "
              f"({index_bytes / 2**20:.0f} MiB)")
        from service.app import create_app
        from service.db import session_scope
        from service.embedding.models import EmbeddingModel
        from service.search.vectors import search_vectors

        app = create_app({"DATABASE_URL": urls["DATABASE_URL"], "REDIS_URL": urls["REDIS_URL"]})
        server = start_api(urls, args.port) if args.http else None
        id_index = {image_id: i for i, image_id in enumerate(ids)}
        rows_out = []
        wanted = {k: m for k, m in members.items() if not args.only or k in args.only.split(",")}
        faiss_rows = faiss_peer(unit, queries, wanted) if args.faiss else {}
        for key, share in SELECTIVITIES.items():
            if key not in wanted:
                continue
            rows = np.flatnonzero(members[key])
            doc = {key: True}
            recalls, full, sql_ms, numpy_ms, methods = [], 0, [], [], {}
            with app.app_context():
                for qi, query in enumerate(queries):
                    t0 = time.perf_counter()
                    truth = exact_topk(unit, query, rows, K)
                    numpy_ms.append((time.perf_counter() - t0) * 1000)
                    with session_scope() as session:
                        model = session.get(EmbeddingModel, model_id)
                        t0 = time.perf_counter()
                        result = search_vectors(query, session=session, model=model, k=K,
                                                filter_doc=doc)
                        elapsed = (time.perf_counter() - t0) * 1000
                    if qi >= 5:  # the first few warm the caches
                        sql_ms.append(elapsed)
                    got = [id_index[h.image.id] for h in result.hits]
                    recalls.append(len(set(got) & set(truth.tolist())) / min(K, len(rows)))
                    full += int(len(got) == min(K, len(rows)))
                    methods[result.plan.method] = methods.get(result.plan.method, 0) + 1
            http = http_latency(app, urls, queries, doc, args) if args.http else None
            p50, p95, p99 = percentiles(sql_ms)
            rows_out.append({
                "selectivity": share, "matches": len(rows), "recall": float(np.mean(recalls)),
                "full": full / len(queries), "p50": p50, "p95": p95, "p99": p99,
                "numpy_p50": percentiles(numpy_ms)[0], "methods": methods, "http": http,
                "faiss": faiss_rows.get(key),
            })
            print(rows_out[-1])
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    report(args, rows_out, dim, load_s, build_s, index_bytes,
           getattr(build_index, "settings", {}))


def start_api(urls: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """gunicorn with the service's app against the bench database, as `make run` starts it."""
    from service.services.ports import wait_for_port

    # Loopback: keys are not required, as under `make run`.
    env = dict(os.environ, **urls, LOOKALIKE_BIND_HOST="127.0.0.1")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "service.wsgi:app",
                             "-b", f"127.0.0.1:{port}", "-w", "2", "--threads", "4"], env=env)
    wait_for_port(port, timeout=60)
    return proc


def http_latency(app: Any, urls: dict[str, str], queries: np.ndarray, doc: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, float]:
    """Whole-request latency through gunicorn, then QPS with 2 concurrent clients."""
    import requests

    base = f"http://127.0.0.1:{args.port}"
    bodies = [{"vector": q.tolist(), "k": K, "filter": doc, "model": "bench"} for q in queries]
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
    """faiss IndexHNSWFlat on the same unit vectors: post-filter and id-selector recall/latency."""
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
    for key, mask in members.items():
        rows = np.flatnonzero(mask)
        truths = [set(exact_topk(unit, q, rows, K).tolist()) for q in qs]
        want = min(K, len(rows))
        post_ms, post_recall, sel_ms, sel_recall = [], [], [], []
        selector = faiss.IDSelectorBatch(rows.astype(np.int64))
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=100)
        for q, truth in zip(qs, truths, strict=True):
            t0 = time.perf_counter()
            _, found = index.search(q[None, :], 100)
            hits = [i for i in found[0] if i >= 0 and mask[i]][:K]
            post_ms.append((time.perf_counter() - t0) * 1000)
            post_recall.append(len(set(hits) & truth) / want)
            t0 = time.perf_counter()
            _, found = index.search(q[None, :], K, params=params)
            sel_ms.append((time.perf_counter() - t0) * 1000)
            sel_recall.append(len({i for i in found[0] if i >= 0} & truth) / want)
        out[key] = {"post_recall": float(np.mean(post_recall)),
                    "post_p99": percentiles(post_ms)[2],
                    "sel_recall": float(np.mean(sel_recall)), "sel_p99": percentiles(sel_ms)[2]}
    return out


def report(args: argparse.Namespace, rows: list[dict[str, Any]], dim: int, load_s: float,
           build_s: float, index_bytes: int, settings: dict[str, str]) -> None:
    lines = [
        f"N = {args.n:,} vectors × {dim} (halfvec), {args.queries} queries, k = {K}. "
        f"Load (COPY) {load_s:.0f} s; HNSW (m=16, ef_construction=64) build {build_s:.0f} s "
        f"(maintenance_work_mem {args.maintenance_work_mem} for the build), "
        f"index {index_bytes / 2**20:.0f} MiB. PostgreSQL: "
        + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) + ".",
        "",
        "| selectivity | matches | plan | recall@10 | full rows | SQL p50 / p95 / p99 ms | "
        "HTTP p50 / p99 ms | QPS (2 clients) | numpy exact p50 ms | faiss HNSW post-filter "
        "recall / p99 ms | faiss id-selector recall / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        http = r["http"]
        f = r["faiss"]
        lines.append(
            f"| {r['selectivity']:.2%} | {r['matches']} | "
            + ", ".join(f"{m} {c}" for m, c in r["methods"].items())
            + f" | {r['recall']:.3f} | {r['full']:.0%} | {r['p50']:.1f} / {r['p95']:.1f} / "
            f"{r['p99']:.1f} | "
            + (f"{http['p50']:.1f} / {http['p99']:.1f} | {http['qps']:.0f} | " if http
               else "– | – | ")
            + f"{r['numpy_p50']:.1f} | "
            + (f"{f['post_recall']:.3f} / {f['post_p99']:.2f} | "
               f"{f['sel_recall']:.3f} / {f['sel_p99']:.2f} |" if f else "– | – |"))
    append_results(f"Filtered search, N = {args.n:,}", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--shared-buffers", default="1GB")
    parser.add_argument("--maintenance-work-mem", default="2GB",
                        help="for the index build (session setting)")
    parser.add_argument("--http", action="store_true", help="also time HTTP requests")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--qps-seconds", type=float, default=20)
    parser.add_argument("--no-faiss", dest="faiss", action="store_false")
    parser.add_argument("--only", default="", help="comma-separated keys: all,f10,f1,f01,f001")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
