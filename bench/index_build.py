"""A model's HNSW index built plain vs CONCURRENTLY: build time, and how long an insert waits.

Loads N random 1280-d halfvec rows under one model into a throwaway PostgreSQL, then builds
the model's partial HNSW index (the statement service/embedding/indexes.py runs) both ways,
alternately. During each build, once PostgreSQL reports it in its "building index" phase,
another connection inserts one image and its vector every `--every` seconds and times each
insert: behind a plain build's SHARE lock it waits for the rest of the build.

    python -m bench.index_build --rows 50000 --rounds 1
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid

import numpy as np


def _load(url: str, rows: int, dim: int, seed: int) -> int:
    import psycopg
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector

    rng = np.random.default_rng(seed)
    with psycopg.connect(url) as conn:
        register_vector(conn)
        model_id = conn.execute("INSERT INTO models (name, version, dim, sha256) "
                                "VALUES ('bench', '1', %s, %s) RETURNING id",
                                (dim, "0" * 64)).fetchone()[0]
        ids = [uuid.uuid4() for _ in range(rows)]
        with conn.cursor().copy("COPY images (id, collection, sha256, mime, format, width, "
                                "height, bytes, metadata, status) FROM STDIN") as copy:
            for i, image_id in enumerate(ids):
                copy.write_row((image_id, "bench", f"{i:064x}", "image/png", "PNG", 1, 1, 1,
                                "{}", "ready"))
        with conn.cursor().copy("COPY image_embeddings (image_id, model_id, vector) "
                                "FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid", "int4", "halfvec"])
            for start in range(0, rows, 5000):
                block = rng.normal(size=(min(5000, rows - start), dim)).astype(np.float16)
                for j, vec in enumerate(block):
                    copy.write_row((ids[start + j], model_id, HalfVector(vec)))
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return int(model_id)


def _insert_once(url: str, model_id: int, dim: int, rng: np.random.Generator) -> float:
    """Milliseconds one image and its vector take to insert and commit."""
    import psycopg

    image_id = uuid.uuid4()
    vec = "[" + ",".join(f"{x:.4f}" for x in rng.normal(size=dim)) + "]"
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO images (id, collection, sha256, mime, format, width, height, "
                     "bytes, metadata, status) VALUES (%s, 'bench', %s, 'image/png', 'PNG', 1, "
                     "1, 1, '{}', 'ready')", (image_id, uuid.uuid4().hex * 2))
        conn.execute("INSERT INTO image_embeddings (image_id, model_id, vector) "
                     "VALUES (%s, %s, %s::halfvec)", (image_id, model_id, vec))
        conn.commit()
    return (time.perf_counter() - started) * 1000


def _phase(url: str, pid: int) -> str | None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT phase FROM pg_stat_progress_create_index WHERE pid = %s",
                           (pid,)).fetchone()
    return None if row is None else str(row[0])


def build_once(url: str, model_id: int, dim: int, concurrent: bool, every: float,
               memory: str) -> tuple[float, list[float]]:
    """(build seconds, insert waits in ms) of one build of the model's index."""
    import psycopg

    from service.embedding.indexes import concurrent_ddl
    from service.embedding.models import hnsw_index, hnsw_index_name

    name = hnsw_index_name(model_id, "cosine")
    ddl = concurrent_ddl(hnsw_index(model_id, dim, "cosine"))
    if not concurrent:
        ddl = ddl.replace("CREATE INDEX CONCURRENTLY", "CREATE INDEX", 1)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP INDEX IF EXISTS "{name}"')
        conn.execute("CHECKPOINT")
    builder = psycopg.connect(url, autocommit=True)
    builder.execute("SELECT set_config('maintenance_work_mem', %s, false)", (memory,))
    pid = builder.execute("SELECT pg_backend_pid()").fetchone()[0]
    took: list[float] = []

    def run() -> None:
        started = time.perf_counter()
        builder.execute(ddl)
        took.append(time.perf_counter() - started)

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive() and not (_phase(url, pid) or "").startswith("building index"):
        time.sleep(0.05)
    rng = np.random.default_rng(0)
    waits: list[float] = []
    while thread.is_alive():
        waits.append(_insert_once(url, model_id, dim, rng))
        time.sleep(every)
    thread.join()
    builder.close()
    return took[0], waits


def main() -> None:
    """Load the rows, build both ways `--rounds` times, print a table."""
    from bench.harness import bench_services, machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between inserts")
    parser.add_argument("--memory", default="512MB", help="maintenance_work_mem of a build")
    args = parser.parse_args()
    lines = []
    with bench_services("index_build") as urls:
        url = urls["DATABASE_URL"]
        started = time.perf_counter()
        model_id = _load(url, args.rows, args.dim, seed=0)
        print(f"loaded {args.rows} x {args.dim} in {time.perf_counter() - started:.1f}s")
        for rnd in range(args.rounds):
            for concurrent in (False, True):
                seconds, waits = build_once(url, model_id, args.dim, concurrent, args.every,
                                            args.memory)
                kind = "CONCURRENTLY" if concurrent else "plain"
                worst = max(waits) if waits else float("nan")
                first = waits[0] if waits else float("nan")
                line = (f"| {rnd + 1} | {kind} | {seconds:.1f} | {len(waits)} | {first:.0f} | "
                        f"{np.median(waits) if waits else float('nan'):.0f} | {worst:.0f} |")
                print(line, flush=True)
                lines.append(line)
    print(f"\nmachine: {machine()}; {args.rows} rows x {args.dim}-d halfvec, HNSW m=16 "
          f"ef_construction=64, maintenance_work_mem {args.memory}\n")
    print("| round | build | build s | inserts during build | first insert ms | "
          "median ms | max ms |\n|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
