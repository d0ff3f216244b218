"""The benchmark harness: throwaway services, real embeddings, machine facts, reporting."""

from __future__ import annotations

import csv
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.config import PROJECT_ROOT, VAR_DIR

CLOTHING = PROJECT_ROOT.parent / "shared" / "datasets" / "clothing"
# The benches' throwaway services live here: elsewhere for the tests that run each bench at
# a tiny size, so that they never remove the folder of a bench running meanwhile.
BENCH_DIR = Path(os.environ.get("LOOKALIKE_BENCH_DIR", VAR_DIR / "bench"))
# Embeddings of the shared photos, kept between runs (and shared with those tests).
CACHE_DIR = VAR_DIR / "bench"
# Elsewhere for trial runs and the tests that run each bench at a tiny size.
RESULTS = Path(os.environ.get("LOOKALIKE_BENCH_RESULTS", PROJECT_ROOT / "docs" / "benchmarks.md"))


def machine() -> str:
    """CPU model, cores and memory of this machine, in one line."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory = f"{mem / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        memory = "?"
    return f"{cpu}, {os.cpu_count()} cores, {memory}, Python {platform.python_version()}"


def command_line() -> str:
    """How this benchmark was invoked."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def append_results(title: str, body: str) -> None:
    """Print a results section and append it to docs/benchmarks.md."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title} — {stamp}\n\n- machine: {machine()}\n"
               f"- command: `{command_line()}`\n\n{body.strip()}\n")
    print(section)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmarks\n\nAppended by the scripts in `bench/`; newest last. "
                           "This machine is shared and noisy: compare figures from the same "
                           "run, as ratios.\n")
    with RESULTS.open("a") as fh:
        fh.write(section)


def percentiles(samples_ms: list[float]) -> tuple[float, float, float]:
    """p50, p95, p99 of a list of milliseconds."""
    arr = np.asarray(samples_ms)
    return tuple(float(np.percentile(arr, p)) for p in (50, 95, 99))  # type: ignore[return-value]


def clothing_labels() -> list[dict[str, str]]:
    """Rows of the shared clothing set's labels.csv."""
    with (CLOTHING / "labels.csv").open() as fh:
        return list(csv.DictReader(fh))


def clothing_embeddings(model_name: str = "efficientnet-lite0",
                        batch_size: int = 16) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Real embeddings of every clothing photo under a model (cached under var/bench)."""
    return clothing_outputs(model_name, "vectors", batch_size)


def clothing_outputs(model_name: str, output: str = "vectors",
                     batch_size: int = 16) -> tuple[np.ndarray, list[dict[str, str]]]:
    """The model's `vectors` or ImageNet `logits` of every clothing photo (cached)."""
    from service.config import load_settings
    from service.embedding.session import get_embedder
    from service.embedding.transforms import batch, preprocess

    rows = clothing_labels()
    cache = CACHE_DIR / (f"clothing-{model_name}.npy" if output == "vectors"
                         else f"clothing-{output}-{model_name}.npy")
    if cache.exists():
        cached = np.load(cache)
        if len(cached) == len(rows):
            return cached, rows
    embedder = get_embedder(load_settings()["MODEL_DIR"], model_name)
    prep = embedder.info.preprocessing
    out = []
    started = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        arrays = [preprocess((CLOTHING / r["file"]).read_bytes(), prep, max_pixels=10**8)
                  for r in chunk]
        result = getattr(embedder.run(batch(arrays)), output)
        if result is None:
            raise ValueError(f"model {model_name!r} has no {output} output")
        out.append(result)
    values = np.concatenate(out).astype(np.float32)
    print(f"ran {model_name} on {len(rows)} photos in {time.perf_counter() - started:.0f}s")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.save(cache, values)
    return values, rows


@contextmanager
def bench_services(name: str, shared_buffers: str = "1GB") -> Iterator[dict[str, str]]:
    """Throwaway PostgreSQL (tuned for the workload) and Redis, migrated; yields their URLs."""
    import shutil

    from service.migrate import upgrade
    from service.services.stack import ephemeral_stack

    folder = BENCH_DIR / name
    shutil.rmtree(folder, ignore_errors=True)
    stack = ephemeral_stack(folder)
    stack.postgres.shared_buffers = shared_buffers
    urls = stack.start()
    try:
        upgrade(urls["DATABASE_URL"])
        yield urls
    finally:
        stack.stop()
        shutil.rmtree(folder, ignore_errors=True)


def wait_for(predicate: Any, what: str, timeout: float = 180.0, every: float = 0.2) -> None:
    """Poll until `predicate()` is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s")


def stop_processes(*procs: subprocess.Popen[bytes]) -> None:
    """Terminate the processes together, then wait for each (killing any that hang)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
