"""Bulk ingestion end to end: the clothing photos through POST /api/v1/jobs until searchable.

For each worker count: throwaway PostgreSQL + Redis, a gunicorn API and one Celery worker with
N prefork processes started here; the photos go up as one tar with labels.csv as metadata.
Reports end-to-end img/s (upload to every image ready), the model-only batch throughput
measured just before on the same files (`Embedder.embed_bytes`, the service's decode+embed
path), their ratio, peak RSS per worker process, database bytes per image, and where the CPU
went (milliseconds of CPU per image in the workers, PostgreSQL, the API and Redis).

`--synthetic N` ingests N images instead: the shared photos re-encoded with small random crops
(so every hash differs), read by the server from a directory under INGEST_ROOTS, and reports
the throughput per tenth of the run, to show whether it stays flat as the collection grows.

    python -m bench.ingest [--workers 1,2,3] [--limit 3308] [--batch 32] [--synthetic 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

from bench.harness import (
    BENCH_DIR,
    CLOTHING,
    append_results,
    clothing_labels,
    percentiles,
    stop_processes,
    wait_for,
)
from service.config import PROJECT_ROOT, load_settings
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


def _variant(job: tuple[int, str, str]) -> None:
    """One re-encoded, randomly cropped copy of a photo (deterministic per index)."""
    import random

    from PIL import Image as PILImage

    index, source, target = job
    rng = random.Random(index)
    with PILImage.open(source) as img:
        img = img.convert("RGB")
        w, h = img.size
        # 1-4% off each side: a different file and hash, the same picture.
        box = (int(w * rng.uniform(0.01, 0.04)), int(h * rng.uniform(0.01, 0.04)),
               w - int(w * rng.uniform(0.01, 0.04)), h - int(h * rng.uniform(0.01, 0.04)))
        img.crop(box).save(target, "JPEG", quality=rng.randint(85, 95))


def build_synthetic(count: int) -> tuple[Path, Path, list[Path]]:
    """`count` cropped, re-encoded copies of the photos in a folder, with their labels.csv."""
    from multiprocessing import Pool

    rows = clothing_labels()
    folder = BENCH_DIR / f"ingest-synthetic-{count}"
    images = folder / "images"
    done_marker = folder / ".complete"
    names = [f"{i // 1000:03d}/{i:06d}.jpg" for i in range(count)]
    sources = [rows[i % len(rows)] for i in range(count)]
    if not done_marker.exists():
        for sub in {n.split("/")[0] for n in names}:
            (images / sub).mkdir(parents=True, exist_ok=True)
        jobs = [(i, str(CLOTHING / src["file"]), str(images / name))
                for i, (name, src) in enumerate(zip(names, sources, strict=True))
                if not (images / name).exists()]
        print(f"writing {len(jobs)} synthetic images to {images}", flush=True)
        with Pool(os.cpu_count() or 1) as pool:
            for n, _ in enumerate(pool.imap_unordered(_variant, jobs, chunksize=64)):
                if n % 10_000 == 0:
                    print(f"  {n}/{len(jobs)}", flush=True)
        done_marker.touch()
    labels = folder / "labels.csv"
    labels.write_text("file,label,sender_id,kids\n" + "".join(
        f"{n},{r['label']},{r['sender_id']},{r['kids']}\n"
        for n, r in zip(names, sources, strict=True)))
    return images, labels, [images / n for n in names]


def model_only_rate(files: list[Path], batch_size: int) -> float:
    """img/s of the service's decode+embed path over the same files, all cores, in-process."""
    from service.embedding.session import get_embedder

    settings = load_settings()
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


def tree_cpu(pid: int | None) -> float:
    """CPU seconds used so far by a process, its live descendants and its reaped children."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in root.children(recursive=True):
            try:
                ct = child.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                continue
        return total
    except psutil.Error:
        return 0.0


def service_pids(folder: Path) -> dict[str, int | None]:
    """The postmaster's and Redis's pids of a bench stack, from their pid files."""
    found: dict[str, int | None] = {"postgres": None, "redis": None}
    for key, pattern in (("postgres", "postmaster.pid"), ("redis", "redis.pid")):
        for path in folder.rglob(pattern):
            with contextlib.suppress(OSError, ValueError, IndexError):
                found[key] = int(path.read_text().split()[0])
    return found


def run_once(workers: int, source: Path, labels: Path, total: int,
             batch_size: int, preloaded: int = 0) -> dict[str, Any]:
    """One end-to-end ingestion with `workers` worker processes on fresh services.

    With `preloaded`, the collection holds that many images before the job, and searches run
    over HTTP before it (idle) and throughout it (busy).
    """
    import urllib.request

    from sqlalchemy import text

    from bench.harness import bench_services
    from bench.ingest_scale import SearchProbe, preload
    from service.cli.ingest import JobsClient
    from service.db import make_engine

    with bench_services(f"ingest-{workers}") as urls:
        storage = BENCH_DIR / f"ingest-storage-{workers}"
        shutil.rmtree(storage, ignore_errors=True)
        env = dict(os.environ, **urls, LOOKALIKE_STORAGE_DIR=str(storage),
                   LOOKALIKE_JOB_BATCH_SIZE=str(batch_size),
                   LOOKALIKE_INGEST_ROOTS=json.dumps([str(source.parent.resolve())]),
                   # Loopback: keys are not required, as under `make run`.
                   LOOKALIKE_BIND_HOST="127.0.0.1",
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
            probe, scale = None, {}
            if preloaded:
                scale = preload(urls["DATABASE_URL"], preloaded, COLLECTION)
                probe = SearchProbe(url, preload.queries, COLLECTION)  # type: ignore[attr-defined]
                scale["idle"] = probe.idle()
                print("preloaded:", scale, flush=True)
            with engine.connect() as conn:
                db_before = conn.scalar(text("SELECT pg_database_size(current_database())"))
            sampler = RssSampler(worker.pid)
            sampler.start()
            client = JobsClient(url)
            pids = service_pids(BENCH_DIR / f"ingest-{workers}")
            parts = {"worker": worker.pid, "postgres": pids["postgres"], "api": api.pid,
                     "redis": pids["redis"]}
            cpu_before = {k: tree_cpu(v) for k, v in parts.items()}
            started = time.perf_counter()
            if probe is not None:
                probe.start()
            if source.is_dir():
                created = client.submit_path(source, collection=COLLECTION, metadata=labels)
            else:
                created = client.submit_archive(source, collection=COLLECTION, metadata=labels)
            submitted = time.perf_counter() - started
            # (seconds, items finished, worker CPU s, PostgreSQL CPU s), every second or so.
            trace: list[tuple[float, int, float, float]] = []
            while True:
                state = client.job(created["id"])
                trace.append((time.perf_counter() - started,
                              state["done"] + state["failed"] + state["duplicates"],
                              tree_cpu(worker.pid), tree_cpu(pids["postgres"])))
                if state["status"] not in ("expanding", "queued", "running"):
                    break
                time.sleep(1.0 if total > 10_000 else 0.25)
            elapsed = time.perf_counter() - started
            if probe is not None:
                probe.stopping.set()
                probe.join()
                scale["busy"] = percentiles(probe.times)
                scale["busy_n"] = len(probe.times)
            cpu = {k: tree_cpu(v) - cpu_before[k] for k, v in parts.items()}
            sampler.stopping.set()
            sampler.join()
            with engine.connect() as conn:
                ready = conn.scalar(text(
                    "SELECT count(*) FROM images i JOIN image_embeddings e ON e.image_id = i.id "
                    "WHERE i.collection = :c AND i.status = 'ready'"), {"c": COLLECTION})
                db_after = conn.scalar(text("SELECT pg_database_size(current_database())"))
            image_id = next(client.items(created["id"], "done"))["image_id"]
            probe = client.request("POST", "/api/v1/search", json={
                "image_id": image_id, "k": 5, "collection": COLLECTION})
            pool = [p for p in sampler.peaks if p != worker.pid]
            return {
                "workers": workers, "status": state["status"], "total": state["total"],
                "done": state["done"], "failed": state["failed"],
                "duplicates": state["duplicates"], "ready": ready, "seconds": elapsed,
                "submit_s": submitted, "rate": total / elapsed,
                "peak_rss_mb": max((sampler.peaks[p] for p in pool), default=0) / 2**20,
                "db_bytes_per_image": (db_after - db_before) / max(ready, 1),
                "db_total_mb": db_after / 2**20, "searchable": len(probe["results"]) == 5,
                "cpu_ms": {k: 1000 * v / max(total, 1) for k, v in cpu.items()},
                "deciles": deciles(trace, total), "preloaded": preloaded, "scale": scale,
            }
        finally:
            stop_processes(worker, api)
            engine.dispose()
            shutil.rmtree(storage, ignore_errors=True)


def deciles(trace: list[tuple[float, int, float, float]],
            total: int) -> list[dict[str, float]]:
    """Throughput and CPU per image over each tenth of the images, from the progress trace."""
    out = []
    for tenth in range(10):
        lo, hi = total * tenth // 10, total * (tenth + 1) // 10
        start = next((p for p in trace if p[1] >= lo), None)
        end = next((p for p in trace if p[1] >= hi), None)
        if start is None or end is None or end[1] <= start[1] or end[0] <= start[0]:
            continue
        n = end[1] - start[1]
        out.append({"from": lo, "to": hi, "rate": n / (end[0] - start[0]),
                    "worker_cpu_ms": 1000 * (end[2] - start[2]) / n,
                    "pg_cpu_ms": 1000 * (end[3] - start[3]) / n})
    return out


def main() -> None:
    """Run the benchmark and append the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--limit", type=int, default=10**9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--synthetic", type=int, default=0,
                        help="ingest this many re-encoded crops from a server directory instead")
    parser.add_argument("--preload", default="0",
                        help="comma-separated sizes the collection has before the job, e.g. "
                             "0,1000000: the rate into each, and search latency during it")
    parser.add_argument("--model-sample", type=int, default=3308,
                        help="files the model-only throughput is measured on")
    args = parser.parse_args()
    if args.synthetic:
        source, labels, files = build_synthetic(args.synthetic)
    else:
        source, labels, files = build_inputs(args.limit)
    load_before = os.getloadavg()
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        model = model_only_rate(files[:args.model_sample], args.batch)
        print(f"model-only: {model:.1f} img/s", flush=True)
        for preloaded in [int(p) for p in args.preload.split(",")]:
            result = run_once(workers, source, labels, len(files), args.batch, preloaded)
            result["model_rate"] = model
            print(result, flush=True)
            rows.append(result)
    load_after = os.getloadavg()
    table = ["| workers | images in the collection before | images | end-to-end img/s | "
             "model-only img/s | ratio | wall s (upload+expand s) | peak RSS / worker MB | "
             "DB bytes / image | failed | ready |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| {r['workers']} | {r['preloaded']:,} | {r['total']} | {r['rate']:.1f} | "
            f"{r['model_rate']:.1f} | "
            f"{r['rate'] / r['model_rate']:.2f} | {r['seconds']:.1f} ({r['submit_s']:.1f}) | "
            f"{r['peak_rss_mb']:.0f} | {r['db_bytes_per_image']:.0f} | {r['failed']} | "
            f"{r['ready']}{'' if r['searchable'] else ' (search failed!)'} |")
    scaled = [r for r in rows if r["preloaded"]]
    if scaled:
        table += ["", "Into a grown collection, against an empty one in the same run, and "
                  "searches (HTTP, k = 10, collection filter) before and during the job:", "",
                  "| workers | images before | rate / empty rate | preload COPY s | compact "
                  "index s | search p50 / p99 ms idle | during the job | p99 ratio | "
                  "searches during |", "|---|---|---|---|---|---|---|---|---|"]
        for r in scaled:
            empty = next((e for e in rows if e["workers"] == r["workers"]
                          and not e["preloaded"]), None)
            sc = r["scale"]
            ratio = f"{r['rate'] / empty['rate']:.2f}" if empty else "–"
            table.append(
                f"| {r['workers']} | {r['preloaded']:,} | {ratio} | {sc['load_s']:.0f} | "
                f"{sc['index_s']:.0f} | {sc['idle'][0]:.1f} / {sc['idle'][2]:.1f} | "
                f"{sc['busy'][0]:.1f} / {sc['busy'][2]:.1f} | "
                f"{sc['busy'][2] / sc['idle'][2]:.2f} | {sc['busy_n']} |")
    table += ["", "CPU per image (ms of CPU time, all processes of each component; robust to "
              "other load, unlike the rates):", "",
              "| workers | Celery workers | PostgreSQL | API | Redis |", "|---|---|---|---|---|"]
    for r in rows:
        c = r["cpu_ms"]
        table.append(f"| {r['workers']} | {c['worker']:.1f} | {c['postgres']:.1f} | "
                     f"{c['api']:.1f} | {c['redis']:.1f} |")
    if args.synthetic:
        table += ["", "Per tenth of the run (collection size when the tenth started and ended):",
                  "", "| workers | images | img/s | worker CPU ms/img | PostgreSQL CPU ms/img |",
                  "|---|---|---|---|---|"]
        for r in rows:
            for d in r["deciles"]:
                table.append(f"| {r['workers']} | {d['from']:,}-{d['to']:,} | {d['rate']:.1f} | "
                             f"{d['worker_cpu_ms']:.1f} | {d['pg_cpu_ms']:.1f} |")
            if len(r["deciles"]) >= 2:
                first, last = r["deciles"][0], r["deciles"][-1]
                table.append(f"| {r['workers']} | last/first tenth | "
                             f"{last['rate'] / first['rate']:.2f} | "
                             f"{last['worker_cpu_ms'] / first['worker_cpu_ms']:.2f} | "
                             f"{last['pg_cpu_ms'] / first['pg_cpu_ms']:.2f} |")
    body = "\n".join(table) + (
        f"\n\nBatch {args.batch}; one gunicorn worker (4 threads) and one Celery worker with N "
        "prefork processes (one ORT thread each when N > 1); model-only = `embed_bytes` over "
        "the same files in one process with all cores, measured just before each run. "
        f"Load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} "
        "(the machine is shared; other jobs were running).\n")
    append_results("Bulk ingestion (bench/ingest.py)", body)


if __name__ == "__main__":
    main()
