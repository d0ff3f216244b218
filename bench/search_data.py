"""The search benches' data: synthetic vectors around real ones, metadata, loading, indexes."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector

# Metadata keys and the share of rows each selects; g10 is drawn independently of f10, so
# that the two ANDed select about 1%.
SELECTIVITIES = {"all": 1.0, "f10": 0.1, "f1": 0.01, "f01": 0.001, "f001": 0.0001, "g10": 0.1}


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
         metadata: list[dict[str, Any]] | None = None,
         compact: bool = False) -> tuple[int, list]:
    """COPY images and vectors in; returns the model id and the image ids.

    Each image's metadata is {key: true} for the `members` masks it is in, or `metadata[i]`.
    With `compact`, the model's projection is fitted first (the service's fit on a random
    sample of FIT_SAMPLE_ROWS) and every vector is written with its compact form, as the
    service writes vectors once a model has a projection.
    """
    from service.embedding.projection import FIT_SAMPLE_ROWS, fit_components, project

    ids = [uuid.uuid4() for _ in range(len(vectors))]
    with psycopg.connect(url) as conn:
        register_vector(conn)
        model_id = conn.execute(
            "INSERT INTO models (name, version, dim, sha256) VALUES ('bench', '1', %s, %s) "
            "RETURNING id", (vectors.shape[1], "0" * 64)).fetchone()[0]
        components = None
        if compact:
            started = time.perf_counter()
            sample = np.random.default_rng(0).choice(len(vectors), min(
                FIT_SAMPLE_ROWS, len(vectors)), replace=False)
            components = fit_components(vectors[np.sort(sample)].astype(np.float32))
            conn.execute("INSERT INTO index_projections (model_id, dim, components, "
                         "fitted_rows) VALUES (%s, %s, %s, %s)",
                         (model_id, components.shape[0], components.tobytes(), len(sample)))
            load.fit_s = time.perf_counter() - started  # type: ignore[attr-defined]
        with conn.cursor().copy(
                "COPY images (id, collection, sha256, mime, format, width, height, bytes, "
                "metadata, status) FROM STDIN") as copy:
            for i, image_id in enumerate(ids):
                meta = metadata[i] if metadata is not None else {
                    key: True for key, mask in members.items() if mask[i]}
                copy.write_row((image_id, "bench", f"{i:064x}", "image/jpeg", "JPEG", 1, 1, 1,
                                json.dumps(meta), "ready"))
        columns = "image_id, model_id, vector" + (", compact" if compact else "")
        with conn.cursor().copy(f"COPY image_embeddings ({columns}) FROM STDIN "
                                "WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid", "int4", "halfvec"] + (["halfvec"] if compact else []))
            for start in range(0, len(ids), 50_000):
                chunk = vectors[start:start + 50_000].astype(np.float32)
                small = project(chunk, components) if components is not None else None
                for j in range(len(chunk)):
                    row = [ids[start + j], model_id, HalfVector(chunk[j])]
                    if small is not None:
                        row.append(HalfVector(small[j]))
                    copy.write_row(row)
        conn.commit()
    return model_id, ids


def build_index(url: str, model_id: int, dim: int,
                maintenance_work_mem: str = "2GB") -> tuple[float, int]:
    """Create the model's HNSW index as the service does; returns seconds and bytes."""
    from service.embedding.models import hnsw_index_name as index_name

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




def prepare_compact(url: str, model_id: int, maintenance_work_mem: str) -> dict[str, Any]:
    """The service's own preparation of compact vectors (fit, fill, index); seconds per step.

    After a `load(..., compact=True)` the fit and fill find their work done, as for a model
    whose vectors were written after its projection.
    """
    from service.app import create_app
    from service.db import session_scope
    from service.embedding import compact
    from service.embedding.models import EmbeddingModel

    app = create_app({"DATABASE_URL": url})
    timings: dict[str, Any] = {}
    with app.app_context(), session_scope() as session:
        started = time.perf_counter()
        model = session.get(EmbeddingModel, model_id)
        assert model is not None
        compact.fit(model, session=session)
        session.commit()
        timings["fit_s"] = time.perf_counter() - started + getattr(load, "fit_s", 0.0)
        started = time.perf_counter()
        timings["filled"] = compact.fill(model, session=session)
        timings["fill_s"] = time.perf_counter() - started
        started = time.perf_counter()
        assert compact.prepare(model_id, session=session,
                               maintenance_work_mem=maintenance_work_mem) == "ready"
        timings["index_s"] = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE image_embeddings")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        sizes = {}
        for relation in (f"ix_image_embeddings_hnsw_compact_m{int(model_id)}",
                         "image_embeddings", "ix_image_embeddings_metadata",
                         "ix_image_embeddings_model_collection", "images"):
            conn.execute("SELECT pg_prewarm(%s)", (relation,))
            sizes[relation] = conn.execute("SELECT pg_relation_size(%s)",
                                           (relation,)).fetchone()[0]
        sizes["toast"] = conn.execute(
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class "
            "WHERE relname = 'image_embeddings'").fetchone()[0]
    timings["sizes"] = sizes
    return timings


def settings(url: str) -> dict[str, str]:
    """The PostgreSQL settings that the figures depend on."""
    with psycopg.connect(url) as conn:
        return dict(conn.execute(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
            "('shared_buffers', 'maintenance_work_mem', 'work_mem', "
            "'max_parallel_maintenance_workers', 'max_parallel_workers_per_gather', "
            "'effective_cache_size')").fetchall())
