"""Every `make bench-*` target runs to the end, at a tiny size, and appends its table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.config import PROJECT_ROOT
from service.services.ports import free_port

TARGETS = {
    "bench-search": ("--n 3000 --queries 8 --qps-seconds 0.5 --no-faiss --shared-buffers 128MB "
                     "--maintenance-work-mem 256MB --port {port}", "Filtered search, N = 3,000"),
    "bench-embed": ("--models efficientnet-lite0 --sample 16 --quality 48",
                    "Embedding models on the clothing photos"),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_bench_target_runs_to_the_end(target: str, model_dir: Path, tmp_path: Path,
                                      settings: dict[str, Any]) -> None:
    args, title = TARGETS[target]
    results = tmp_path / "benchmarks.md"
    env = {**os.environ, "LOOKALIKE_MODEL_DIR": str(model_dir),
           "LOOKALIKE_BENCH_DIR": str(tmp_path / "bench"),
           "LOOKALIKE_BENCH_RESULTS": str(results)}
    done = subprocess.run(["make", "--no-print-directory", target,
                           f"BENCH_ARGS={args.format(port=free_port())}"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    text = results.read_text()
    assert f"## {title}" in text and "|---|" in text, text[-2000:]
    assert not (tmp_path / "bench" / "search").exists()  # its services cleaned up
