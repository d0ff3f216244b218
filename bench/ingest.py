"""Bulk ingestion end to end: the clothing photos through POST /api/v1/jobs until searchable.

For each worker count: throwaway PostgreSQL + Redis, a gunicorn API and one Celery worker with
N prefork processes started here; the photos go up as one tar with labels.csv as metadata.
Reports end-to-end img/s (upload to every image ready), the model-only batch throughput
measured just before on the same files (`Embedder.embed_bytes`, the service's decode+embed
path), their ratio, peak RSS per worker process, and database bytes per image.

    python -m bench.ingest [--workers 1,2] [--limit 3308] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import BENCH_DIR, CLOTHING, append_results, clothing_labels
from service.config import PROJECT_ROOT, settings_from_env
from service.services.ports import free_port

COLLECTION = "bench-ingest"


def build_inputs(limit: int) -> tuple[Path, Path, list[Path]]:
    """An uncompressed tar of the photos (JPEGs do not compress) and the matching labels.csv."""
    rows = clothing_labels()[:limit]
    folder = BENCH_DIR / "ingest-inputs"
    folder.mkdir(parents=True, exist_ok=True)
    archive, labels = folder / f"clothing-{len(rows)}.tar", folder / f"labels-{len(rows)}.csv"
    files = [CLOTHING / r["file"] for r in rows]
    if not archive.exists():
        tmp = archive.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tf:
            for row, path in zip(rows, files, strict=True):
                tf.add(path, arcname=row["file"], recursive=False)
        tmp.replace(archive)
    header = "file,label,sender_id,kids\n"
    labels.write_text(header + "".join(
        f"{r['file']},{r['label']},{r['sender_id']},{r['kids']}\n" for r in rows))
    return archive, labels, files


def model_only_rate(files: list[Path], batch_size: int) -> float:
    """img/s of the service's decode+embed path over the same files, all cores, in-process."""
    from service.embedding.session import get_embedder

    settings = settings_from_env()
    embedder = get_embedder(settings["MODEL_DIR"], settings["DEFAULT_MODEL"])
    datas = [p.read_bytes() for p in files]
    embedder.embed_bytes(datas[:batch_size], max_pixels=64_000_000)  # warm up
    started = time.perf_counter()
    for i in range(0, len(datas), batch_size):
        embedder.embed_bytes(datas[i:i + batch_size], max_pixels=64_000_000)
    return len(datas) / (time.perf_counter() - started)


class RssSampler(threading.Thread):
    """Peak RSS of each child of the Celery main process, sampled every 100 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peaks: dict[int, int] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                for child in self.root.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                    except psutil.Error:
                        continue
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), rss)
            except psutil.Error:
                pass
            time.sleep(0.1)


def wait_for(predicate: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def run_once(workers: int, archive: Path, labels: Path, total: int,
             batch_size: int) -> dict[str, Any]:
    """One end-to-end ingestion with `workers` worker processes on fresh services."""
    import urllib.request

    from sqlalchemy import text

    from bench.common import bench_services
    from service.db import make_engine
    from service.jobs.client import JobsClient

    with bench_services(f"ingest-{workers}") as urls:
        storage = BENCH_DIR / f"ingest-storage-{workers}"
        shutil.rmtree(storage, ignore_errors=True)
        env = dict(os.environ, **urls, LOOKALIKE_STORAGE_DIR=str(storage),
                   LOOKALIKE_JOB_BATCH_SIZE=str(batch_size),
                   # Several processes on few cores: one ORT thread each, no oversubscription.
                   LOOKALIKE_ORT_INTRA_OP_THREADS="1" if workers > 1 else "0")
        port = free_port()
        bin_dir = Path(sys.executable).parent
        logs = BENCH_DIR / f"ingest-{workers}-logs"
        logs.mkdir(parents=True, exist_ok=True)
        api = subprocess.Popen(
            [str(bin_dir / "gunicorn"), "service.wsgi:app", "-b", f"127.0.0.1:{port}", "-w", "1",
             "--threads", "4", "--timeout", "300"], cwd=PROJECT_ROOT, env=env,
            stdout=(logs / "api.log").open("wb"), stderr=subprocess.STDOUT)
        worker_log = logs / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
             "-c", str(workers), "-Q", "lookalike", "--loglevel", "INFO", "--without-gossip",
             "--without-mingle", "--without-heartbeat"], cwd=PROJECT_ROOT, env=env,
            stdout=worker_log.open("wb"), stderr=subprocess.STDOUT)
        engine = make_engine(urls["DATABASE_URL"])
        try:
            url = f"http://127.0.0.1:{port}"

            def api_up() -> bool:
                try:
                    return urllib.request.urlopen(f"{url}/healthz", timeout=2).status == 200
                except OSError:
                    return False

            wait_for(api_up, "the API")
            wait_for(lambda: b"ready." in worker_log.read_bytes(), "the worker")
            with engine.connect() as conn:
                db_before = conn.scalar(text("SELECT pg_database_size(current_database())"))
            sampler = RssSampler(worker.pid)
            sampler.start()
            client = JobsClient(url)
            started = time.perf_counter()
            created = client.submit_archive(archive, collection=COLLECTION, metadata=labels)
            submitted = time.perf_counter() - started
            while True:
                state = client.job(created["id"])
                if state["status"] not in ("queued", "running"):
                    break
                time.sleep(0.25)
            elapsed = time.perf_counter() - started
            sampler.stopping.set()
            sampler.join()
            with engine.connect() as conn:
                ready = conn.scalar(text(
                    "SELECT count(*) FROM images i JOIN image_embeddings e ON e.image_id = i.id "
                    "WHERE i.collection = :c AND i.status = 'ready'"), {"c": COLLECTION})
                db_after = conn.scalar(text("SELECT pg_database_size(current_database())"))
            image_id = next(client.items(created["id"], "done"))["image_id"]
            probe = client._send("POST", "/api/v1/search", [
                f'{{"image_id": "{image_id}", "k": 5, "collection": "{COLLECTION}"}}'.encode()],
                {"Content-Type": "application/json"})
            pool = [p for p in sampler.peaks if p != worker.pid]
            return {
                "workers": workers, "status": state["status"], "total": state["total"],
                "done": state["done"], "failed": state["failed"],
                "duplicates": state["duplicates"], "ready": ready, "seconds": elapsed,
                "submit_s": submitted, "rate": total / elapsed,
                "peak_rss_mb": max((sampler.peaks[p] for p in pool), default=0) / 2**20,
                "db_bytes_per_image": (db_after - db_before) / max(ready, 1),
                "db_total_mb": db_after / 2**20, "searchable": len(probe["results"]) == 5,
            }
        finally:
            for proc in (worker, api):
                proc.terminate()
            for proc in (worker, api):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            engine.dispose()
            shutil.rmtree(storage, ignore_errors=True)


def main() -> None:
    """Run the benchmark and append the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--limit", type=int, default=10**9)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    archive, labels, files = build_inputs(args.limit)
    load_before = os.getloadavg()
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        model = model_only_rate(files, args.batch)
        print(f"model-only: {model:.1f} img/s", flush=True)
        result = run_once(workers, archive, labels, len(files), args.batch)
        result["model_rate"] = model
        print(result, flush=True)
        rows.append(result)
    load_after = os.getloadavg()
    table = ["| workers | images | end-to-end img/s | model-only img/s | ratio | wall s "
             "(upload+expand s) | peak RSS / worker MB | DB bytes / image | failed | ready |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| {r['workers']} | {r['total']} | {r['rate']:.1f} | {r['model_rate']:.1f} | "
            f"{r['rate'] / r['model_rate']:.2f} | {r['seconds']:.1f} ({r['submit_s']:.1f}) | "
            f"{r['peak_rss_mb']:.0f} | {r['db_bytes_per_image']:.0f} | {r['failed']} | "
            f"{r['ready']}{'' if r['searchable'] else ' (search failed!)'} |")
    body = "\n".join(table) + (
        f"\n\nBatch {args.batch}; one gunicorn worker (4 threads) and one Celery worker with N "
        "prefork processes (one ORT thread each when N > 1); model-only = `embed_bytes` over "
        "the same files in one process with all cores, measured just before each run. "
        f"Load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} "
        "(the machine is shared; other jobs were running).\n")
    append_results("Bulk ingestion (bench/ingest.py)", body)


if __name__ == "__main__":
    main()
