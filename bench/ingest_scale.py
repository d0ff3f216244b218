"""Ingestion into a collection that already holds N images, and searches while a job runs.

`preload` writes N synthetic vectors (bench/search_data.py: real features moved along their
principal directions) for the service's default model into the bench collection, with their
compact forms and the compact index prepared by the service, as if the collection had grown
by uploads; `SearchProbe` times searches over HTTP before and during a bulk job.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector

from bench.harness import clothing_embeddings, percentiles
from bench.search_data import synthesize


def preload(url: str, count: int, collection: str) -> dict[str, float]:
    """Write `count` ready images with vectors of the default model; seconds per step."""
    from service.app import create_app
    from service.config import load_settings
    from service.db import session_scope
    from service.embedding import compact
    from service.embedding.projection import FIT_SAMPLE_ROWS, fit_components, project
    from service.embedding.service import ensure_model_row
    from service.embedding.session import get_embedder

    settings = load_settings()
    info = get_embedder(settings["MODEL_DIR"], settings["DEFAULT_MODEL"]).info
    app = create_app({"DATABASE_URL": url})
    with app.app_context(), session_scope() as session:
        model_id = int(ensure_model_row(info, session=session).id)
    rng = np.random.default_rng(11)
    base, _ = clothing_embeddings()
    vectors = synthesize(base, count, rng).astype(np.float32)
    started = time.perf_counter()
    components = fit_components(vectors[:FIT_SAMPLE_ROWS])
    ids = [uuid.uuid4() for _ in range(count)]
    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute("INSERT INTO index_projections (model_id, dim, components, fitted_rows) "
                     "VALUES (%s, %s, %s, %s)", (model_id, components.shape[0],
                                                 components.tobytes(), FIT_SAMPLE_ROWS))
        with conn.cursor().copy(
                "COPY images (id, collection, sha256, mime, format, width, height, bytes, "
                "metadata, status) FROM STDIN") as copy:
            for i, image_id in enumerate(ids):
                copy.write_row((image_id, collection, f"{i:064x}", "image/jpeg", "JPEG", 1, 1,
                                1, '{"preloaded": true}', "ready"))
        with conn.cursor().copy("COPY image_embeddings (image_id, model_id, vector, compact) "
                                "FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid", "int4", "halfvec", "halfvec"])
            for start in range(0, count, 50_000):
                chunk = vectors[start:start + 50_000]
                small = project(chunk, components)
                for j in range(len(chunk)):
                    copy.write_row((ids[start + j], model_id, HalfVector(chunk[j]),
                                    HalfVector(small[j])))
        conn.commit()
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    with app.app_context(), session_scope() as session:
        assert compact.prepare(model_id, session=session, maintenance_work_mem="2GB") == "ready"
    indexed = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE image_embeddings")
        conn.execute("VACUUM ANALYZE images")
    preload.queries = vectors[rng.choice(count, 200, replace=False)]  # type: ignore[attr-defined]
    return {"load_s": loaded, "index_s": indexed}


class SearchProbe(threading.Thread):
    """Searches one after another over HTTP until stopped; latencies in ms."""

    def __init__(self, url: str, queries: np.ndarray, collection: str) -> None:
        super().__init__(daemon=True)
        import requests

        self.session = requests.Session()
        self.url, self.collection = url, collection
        self.bodies = [{"vector": q.tolist(), "k": 10, "collection": collection}
                       for q in queries]
        self.times: list[float] = []
        self.stopping = threading.Event()

    def one(self, i: int) -> None:
        t0 = time.perf_counter()
        resp = self.session.post(f"{self.url}/api/v1/search",
                                 json=self.bodies[i % len(self.bodies)], timeout=60)
        resp.raise_for_status()
        self.times.append((time.perf_counter() - t0) * 1000)

    def idle(self, count: int = 100) -> tuple[float, float, float]:
        """p50/p95/p99 of `count` searches with nothing else running."""
        for i in range(10):
            self.one(i)
        self.times = []
        for i in range(count):
            self.one(i)
        out, self.times = percentiles(self.times), []
        return out

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            self.one(i)
            i += 1
            time.sleep(0.05)
