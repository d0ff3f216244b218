"""Mixed traffic against a running stack: throughput, latency per kind, and no unbounded growth.

Throwaway PostgreSQL + Redis, a gunicorn API (the `lookalike run` shape: 2 workers x 4 threads)
with API keys required and rate limiting on (limits set high, so the limiter's Redis round trip
is measured but nothing is refused), and one Celery worker, all on 127.0.0.1. A collection is
seeded with clothing photos (labels.csv as metadata) through the jobs API; then 8 client
threads send, for a bounded time: 80% search by image_id with a metadata filter, 15% search by
an uploaded photo, 5% uploads of new photos. Reports throughput, p50/p95/p99 per kind, errors,
and the RSS of the gunicorn and Celery process trees and PostgreSQL's connection count sampled
at the start, middle and end.

    python -m bench.load [--seconds 60] [--clients 8] [--seed 400]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from bench.harness import (
    BENCH_DIR,
    CLOTHING,
    append_results,
    clothing_labels,
    percentiles,
    stop_processes,
    wait_for,
)
from service.config import PROJECT_ROOT
from service.services.ports import free_port

COLLECTION = "bench-load"
KINDS = ("search_id", "search_photo", "upload")
MIX = (0.80, 0.15, 0.05)
API_WORKERS, API_THREADS = 2, 4


@dataclass
class Tally:
    """Latencies and errors per kind, shared by the client threads."""

    ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, ms: float, outcome: str | None) -> None:
        """Record one request (outcome None: success)."""
        with self.lock:
            if outcome is None:
                self.ms[kind].append(ms)
            else:
                self.errors[kind][outcome] += 1


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, in MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def pg_connections(url: str) -> int:
    """Client connections to the benchmark database right now."""
    import psycopg

    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                "current_database() AND backend_type = 'client backend'"
                                ).fetchone()[0]) - 1  # not this probe itself


def create_key(database_url: str) -> str:
    """A write key for the benchmark collection, created as `lookalike keys create` would."""
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import NullPool

    from service.auth.service import create_key as make
    from service.db import make_engine

    engine = make_engine(database_url, poolclass=NullPool)
    with Session(engine) as session:
        token = make(session=session, scope="write", collections=[COLLECTION],
                     name="bench").token
        session.commit()
    engine.dispose()
    return token


def seed_archive(rows: list[dict[str, str]]) -> bytes:
    """A zip of the seed photos with a metadata.csv (label, sender_id, kids)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        meta = io.StringIO()
        writer = csv.DictWriter(meta, fieldnames=["file", "label", "sender_id", "kids"])
        writer.writeheader()
        for row in rows:
            name = Path(row["file"]).name
            zf.writestr(name, (CLOTHING / row["file"]).read_bytes())
            writer.writerow({**row, "file": name})
        zf.writestr("metadata.csv", meta.getvalue())
    return out.getvalue()


class Client(threading.Thread):
    """One client: a kind drawn from the mix, one request, repeat until the deadline."""

    def __init__(self, n: int, url: str, token: str, ids: list[str], labels: list[str],
                 queries: list[Path], uploads: list[tuple[Path, dict[str, Any]]],
                 deadline: float, tally: Tally) -> None:
        super().__init__(daemon=True)
        self.rng = random.Random(n)
        self.url, self.ids, self.labels, self.queries = url, ids, labels, queries
        self.uploads, self.deadline, self.tally = uploads, deadline, tally
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            kind = self.rng.choices(KINDS, weights=MIX)[0]
            started = time.perf_counter()
            try:
                resp = self.send(kind)
                outcome = None if resp is None or resp.ok else str(resp.status_code)
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            self.tally.add(kind, (time.perf_counter() - started) * 1000, outcome)

    def send(self, kind: str) -> requests.Response | None:
        """One request of a kind."""
        api = f"{self.url}/api/v1"
        if kind == "search_id":
            body = {"image_id": self.rng.choice(self.ids), "k": 10, "collection": COLLECTION,
                    "filter": {"label": {"$in": self.rng.sample(self.labels, 3)}}}
            return self.http.post(f"{api}/search", json=body, timeout=60)
        if kind == "search_photo":
            path = self.rng.choice(self.queries)
            return self.http.post(f"{api}/search", timeout=60, files={
                "file": (path.name, path.read_bytes(), "image/jpeg")},
                data={"query": json.dumps({"k": 10, "collection": COLLECTION})})
        try:
            path, meta = self.uploads.pop()
        except IndexError:
            return None  # every spare photo is in; count it as a no-op success
        return self.http.post(f"{api}/images", timeout=60, files={
            "file": (path.name, path.read_bytes(), "image/jpeg")},
            data={"collection": COLLECTION, "metadata": json.dumps(meta)})


def main() -> None:
    """Seed, run the mixed load for a bounded time, report and append to docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=400, help="photos ingested before the load")
    parser.add_argument("--note", default="", help="a line added to the results")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 600:
        parser.error("--seconds must be between 1 and 600 (the run is bounded)")

    from bench.harness import bench_services

    rows = clothing_labels()
    random.Random(0).shuffle(rows)
    seed_rows, spare_rows = rows[:args.seed], rows[args.seed:]
    labels = sorted({r["label"] for r in rows})
    with bench_services("load", shared_buffers="256MB") as urls:
        storage = BENCH_DIR / "load-storage"
        shutil.rmtree(storage, ignore_errors=True)
        env = dict(os.environ, **urls, LOOKALIKE_STORAGE_DIR=str(storage),
                   LOOKALIKE_AUTH_REQUIRED="true", LOOKALIKE_BIND_HOST="127.0.0.1",
                   LOOKALIKE_RATE_LIMIT_DEFAULT="1000000/minute",
                   LOOKALIKE_RATE_LIMIT_UPLOAD="1000000/minute")
        token = create_key(urls["DATABASE_URL"])
        port = free_port()
        bin_dir = Path(sys.executable).parent
        logs = BENCH_DIR / "load-logs"
        logs.mkdir(parents=True, exist_ok=True)
        api = subprocess.Popen(
            [str(bin_dir / "gunicorn"), "service.wsgi:app", "-b", f"127.0.0.1:{port}",
             "-w", str(API_WORKERS), "--threads", str(API_THREADS), "--timeout", "120"],
            cwd=PROJECT_ROOT, env=env, stdout=(logs / "api.log").open("wb"),
            stderr=subprocess.STDOUT)
        worker_log = logs / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
             "-c", "1", "-Q", "lookalike", "--loglevel", "INFO", "--without-gossip",
             "--without-mingle", "--without-heartbeat"], cwd=PROJECT_ROOT, env=env,
            stdout=worker_log.open("wb"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        try:
            wait_for(lambda: _ok(f"{url}/healthz"), "the API")
            wait_for(lambda: b"ready." in worker_log.read_bytes(), "the worker")
            started = time.perf_counter()
            job = http.post(f"{url}/api/v1/jobs", files={
                "file": ("seed.zip", seed_archive(seed_rows), "application/zip")},
                data={"collection": COLLECTION}, timeout=300)
            job.raise_for_status()
            job_id = job.json()["id"]
            wait_for(lambda: http.get(f"{url}/api/v1/jobs/{job_id}", timeout=30).json()["status"]
                     not in ("expanding", "queued", "running"), "the seed job", 900)
            seed_s = time.perf_counter() - started
            ids: list[str] = []
            cursor = None
            while True:
                page = http.get(f"{url}/api/v1/images", timeout=30, params={
                    "collection": COLLECTION, "status": "ready", "limit": 500,
                    **({"cursor": cursor} if cursor else {})}).json()
                ids += [i["id"] for i in page["items"]]
                cursor = page["next_cursor"]
                if not cursor:
                    break
            queries = [CLOTHING / r["file"] for r in spare_rows[:200]]
            uploads = [(CLOTHING / r["file"], {"label": r["label"], "sender_id": r["sender_id"]})
                       for r in spare_rows[200:]]
            tally = Tally()
            samples: list[dict[str, Any]] = []

            def sample(when: str) -> None:
                samples.append({"when": when, "api_mb": tree_rss_mb(api.pid),
                                "worker_mb": tree_rss_mb(worker.pid),
                                "pg_conns": pg_connections(urls["DATABASE_URL"])})

            load_avg_before = os.getloadavg()[0]
            sample("start")
            deadline = time.monotonic() + args.seconds
            clients = [Client(n, url, token, ids, labels, queries, uploads, deadline, tally)
                       for n in range(args.clients)]
            load_started = time.perf_counter()
            for client in clients:
                client.start()
            time.sleep(args.seconds / 2)
            sample("middle")
            for client in clients:
                client.join(timeout=args.seconds + 120)
            elapsed = time.perf_counter() - load_started
            sample("end")
            load_avg_after = os.getloadavg()[0]
        finally:
            stop_processes(worker, api)
            shutil.rmtree(storage, ignore_errors=True)
    report(args, tally, samples, elapsed, len(ids), seed_s, load_avg_before, load_avg_after)


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def report(args: argparse.Namespace, tally: Tally, samples: list[dict[str, Any]],
           elapsed: float, seeded: int, seed_s: float, before: float, after: float) -> None:
    """The results table, printed and appended to docs/benchmarks.md."""
    total = sum(len(v) for v in tally.ms.values())
    errors = sum(sum(e.values()) for e in tally.errors.values())
    lines = [f"{args.clients} clients for {elapsed:.0f} s against {seeded} seeded images "
             f"(seeded through the jobs API in {seed_s:.0f} s): **{total / elapsed:.1f} "
             f"requests/s** succeeded, {errors} errors.", "",
             "| kind | share | requests | req/s | p50 ms | p95 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, share in zip(KINDS, MIX, strict=True):
        ms = tally.ms.get(kind, [])
        p50, p95, p99 = percentiles(ms) if ms else (float("nan"),) * 3
        errs = ", ".join(f"{k}: {v}" for k, v in tally.errors.get(kind, {}).items()) or "0"
        lines.append(f"| {kind} | {share:.0%} | {len(ms)} | {len(ms) / elapsed:.1f} | "
                     f"{p50:.0f} | {p95:.0f} | {p99:.0f} | {errs} |")
    lines += ["", "| sampled at | gunicorn RSS MiB (master + workers) | Celery RSS MiB "
              "(main + pool) | PostgreSQL client connections |", "|---|---|---|---|"]
    lines += [f"| {s['when']} | {s['api_mb']:.0f} | {s['worker_mb']:.0f} | {s['pg_conns']} |"
              for s in samples]
    lines += ["", f"gunicorn {API_WORKERS} workers x {API_THREADS} threads, SQLAlchemy pool "
              "5 + 5 overflow per process, one Celery worker (1 process); API keys required "
              "and rate limiting on (limits set high: counted in Redis, nothing refused). "
              "search_id = by a stored image with a `$in` filter on label; search_photo = "
              "multipart photo (embedded in the API process); upload = a new photo (202, then "
              f"embedded by the worker). Load average before/after: {before:.1f} / {after:.1f}."]
    lines.append("The start sample precedes the first photo search, which loads the model "
                 "into each gunicorn worker.")
    if args.note:
        lines.append(f"Note: {args.note}")
    append_results(f"Mixed load (bench/load.py), {args.clients} clients", "\n".join(lines))


if __name__ == "__main__":
    main()
